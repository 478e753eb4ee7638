#!/usr/bin/env bash
# Issue 17's GPU run, several variants side by side on one GPU (the fit is launch-bound: four to six
# fits share an H100/H200 at about 1.2-1.5x the time of one). Each variant adds --set pairs to the
# best recipe so far: depth supervision, SH 0, the training views warped into a path camera through
# their own depth at every step (benchmarks/RESULTS.md, issue 17 twelfth pass), on the 7-view orbit
# with view 3 held out, 16 frames at 256 px, 7000 steps (2000 coarse).
#
#   benchmarks/fit_quality_gpu.sh OUT_DIR NAME=PAIRS... [-- extra fit_quality args]
#   benchmarks/fit_quality_gpu.sh /tmp/fq best= w2=warp:weight=2.0 "render_depth=warp:depth=render warp:views=2"
#   benchmarks/fit_quality_gpu.sh /tmp/fqs best= \
#     "plain=model.init_args.temporal_opacity=false data.init_args.split_static=false" -- --only static
#
# A pair "warp:KEY=VALUE" sets one of the warp's init_args (VALUE as JSON: numbers, true, or a bare string).
# Extra fit_quality args go after "--" and override the run's (--steps, --size, ...), but not --set:
# give --set pairs in the variants.
#
# Each variant's log is OUT_DIR/NAME.log; its "fit_quality dynamic regions:" line (printed first after
# the fit) holds the covered held-out PSNR, then "between:" the in-between frames'. Three fits side by side
# on one H100 train 7000 steps in about 8 minutes. Several pairs in one variant: separate them with spaces.
set -uo pipefail
out=$1; shift
mkdir -p "$out"
# the best so far (twelfth pass, H100: 30.61 dB covered, training views 37.33): the warp through the
# training views' depth (their meshes), weight 4, 3 views, from step 100, at every step
warp_base='model.init_args.regularizers=[{"class_path":"fourdgen.gaussians.regularizers.WarpConsistency","init_args":{"weight":4.0,"start_step":100,"frames":1,"depth":"views","views":3}}]'
best="model.init_args.depth_weight=1.0 data.init_args.train_depth=true model.init_args.sh_degree=0 model.init_args.regularize_every=1"
variants=(); extra=()
while (($#)); do
  if [[ $1 == -- ]]; then shift; extra=("$@"); break; fi
  variants+=("$1"); shift
done
set -f  # the pairs hold JSON brackets: no globbing
for v in "${variants[@]}"; do
  name=${v%%=*} pairs="" wargs=""
  for p in ${v#*=}; do
    if [[ $p == warp:* ]]; then
      kv=${p#warp:} key=${kv%%=*} val=${kv#*=}
      [[ $val =~ ^(-?[0-9.e-]+|true|false|null)$ ]] || val="\"$val\""
      wargs+=",\"$key\":$val"
    else
      pairs+=" $p"
    fi
  done
  warp=${warp_base/\"frames\":1/\"frames\":1$wargs}
  # shellcheck disable=SC2086  # the pairs are split on purpose
  python3 benchmarks/fit_quality.py --config lightning_configs/fit/full4d.yaml --views 7 --frames 16 --size 256 \
    --holdout 3 --no-export --steps 7000 --coarse 2000 --only dynamic --scene-dir "$out/scene_$name" \
    "${extra[@]}" --set $best "$warp" $pairs >"$out/$name.log" 2>&1 &
done
wait
set +f
grep -H -E "fit_quality dynamic (regions|between)" "$out"/*.log
