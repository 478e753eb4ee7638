#!/usr/bin/env bash
# Wheels for a GPU machine without internet whose Python already has torch, lightning, peft, timm,
# einops, tensorboard and torchmetrics (a typical PyTorch image): fourdgen's other dependencies.
#
#   tools/offline_wheels.sh [DIR] [PYTHON_VERSION]      # default .whl, 3.12
#   # there:  pip install --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site:$PWD
#
# gsplat compiles its CUDA code at first use there (about 95 s on an H200). imageio-ffmpeg (68 MB) is
# left out: mp4 writing then fails with a message, PNG frames still work. viser (the browser
# viewer) and its dependencies are left out: `fourdgen view` is for a machine with a display.
set -euo pipefail
dir=${1:-.whl}
py=${2:-3.12}
pkgs=(
  diffusers==0.42.1 importlib_metadata==10.2.0  # Wan DiT and VAE, schedulers
  gsplat==1.5.3 jaxtyping==0.3.11 wadler_lindig==0.1.8  # rasterizer
  lpips==0.1.4
  jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0  # LightningCLI configs
  torchdata==0.11.0  # resumable DataLoader
  plyfile==1.1.5  # 3DGS PLY export
)
for p in "${pkgs[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" "$p"
done
ls "$dir"
