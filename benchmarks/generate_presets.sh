#!/usr/bin/env bash
# fourdgen generate at preset sizes with random weights, on one GPU: the 4DNeX image_to_4d and the
# Full-4D video_to_4d_gaussians pipelines. Times per step land in runs/*/generate.json (steps.*.seconds)
# for benchmarks/RESULTS.md. Random weights make noise: this measures time and memory only.
#   bash benchmarks/generate_presets.sh 4dnex      # random 14B-I2V LoRA checkpoint, then the pipeline
#   bash benchmarks/generate_presets.sh full4d     # random 5B grid checkpoint, then the pipeline
# Shorter runs for one 10-minute device call (per-step times scale): SAMPLE_STEPS (sampler steps),
# FIT_STEPS and FMD_START (the fit's steps, and the step FMD starts at).
# The random checkpoint and depth model are built once and reused; RESUME=1 passes --resume.
# Needs imageio-ffmpeg (the writers write mp4); text/image encoders are the weight-free hash
# stand-ins; the depth model is the tiny random one (its step time is not Depth Anything V2's).
set -euo pipefail
HASH_T='{class_path: fourdgen.backbones.text.HashTextEncoder, init_args: {dim: 4096, length: 512}}'
HASH_I='{class_path: fourdgen.backbones.image.HashImageEncoder, init_args: {dim: 1280, tokens: 257}}'
mkdir -p runs/inputs outputs/random
python - <<'PY'
import numpy as np, imageio.v2 as iio, os
rng = np.random.default_rng(0)
iio.imwrite("runs/inputs/image.png", (rng.random((480, 720, 3)) * 255).astype(np.uint8))
os.makedirs("runs/inputs/frames", exist_ok=True)
for t in range(81):  # a folder of frames: no mp4 decoding needed on the device
    iio.imwrite(f"runs/inputs/frames/{t:04d}.png", (rng.random((384, 672, 3)) * 255).astype(np.uint8))
PY
case "${1:-}" in
4dnex)
  python tools/random_checkpoint.py --config lightning_configs/video/4dnex.yaml \
    --model.init_args.transformer '{preset: 14b-i2v}' --model.init_args.vae '{preset: wan2.1}' \
    --data.init_args.text_encoder "$HASH_T" --data.init_args.image_encoder "$HASH_I" \
    --trainer.devices 1 --trainer.strategy auto --out outputs/random/4dnex.ckpt
  fourdgen generate --pipeline lightning_configs/pipelines/image_to_4d.yaml --input runs/inputs/image.png \
    --out runs/4dnex_random --weights video=outputs/random/4dnex.ckpt \
    --set "video.model.init_args.transformer={preset: 14b-i2v}" --set "video.model.init_args.vae={preset: wan2.1}" \
    --set "video.data.init_args.text_encoder=$HASH_T" --set "video.data.init_args.image_encoder=$HASH_I" \
    --set "video.model.init_args.sample_steps=${SAMPLE_STEPS:-50}"
  ;;
full4d)
  [ -d outputs/random/depth ] || python tools/tiny_depth_model.py outputs/random/depth
  [ -f outputs/random/full4d.ckpt ] || python tools/random_checkpoint.py --config lightning_configs/video/full4d.yaml \
    --model.init_args.transformer '{preset: 5b}' --model.init_args.vae '{preset: wan2.2}' \
    --model.init_args.lpips_net null --data.init_args.text_encoder "$HASH_T" \
    --trainer.devices 1 --trainer.strategy auto --out outputs/random/full4d.ckpt
  PRIOR='[{class_path: fourdgen.gaussians.fmd.FlowMatchingDistillation, init_args: {prior: {class_path: fourdgen.stages.grid_prior.GridPrior, init_args: {checkpoint: outputs/random/full4d.ckpt, transformer: {preset: 5b}, vae: {preset: wan2.2}, text_encoder: '"$HASH_T"', dtype: bfloat16}}, weight: 0.1, start_step: '"${FMD_START:-3000}"', every: 1, guidance_scale: 5.0, prior_device: null}}]'
  fourdgen generate --pipeline lightning_configs/pipelines/video_to_4d_gaussians.yaml --input runs/inputs/frames \
    --out runs/full4d_random ${RESUME:+--resume} --weights grid=outputs/random/full4d.ckpt --weights depth=outputs/random/depth \
    --set "grid.model.init_args.transformer={preset: 5b}" --set "grid.model.init_args.vae={preset: wan2.2}" \
    --set "grid.data.init_args.text_encoder=$HASH_T" --set "grid.model.init_args.sample_steps=${SAMPLE_STEPS:-10}" \
    --set "fit.model.init_args.regularizers=$PRIOR" --set "fit.trainer.max_steps=${FIT_STEPS:-3020}"
  ;;
*) echo "usage: $0 4dnex|full4d" >&2; exit 2 ;;
esac
