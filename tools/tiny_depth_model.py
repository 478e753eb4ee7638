"""Save a tiny random Depth Anything checkpoint (model + image processor) for CPU runs of the
Full-4D pipeline (lightning_configs/pipelines/tiny/video_to_4d_gaussians.yaml) and its tests:

    python tools/tiny_depth_model.py outputs/tiny_depth

Random weights: its depth means nothing; it exercises the same loading code as Depth Anything V2
(transformers' ``depth_anything`` model type, DPT image processor). The real model is a local
folder such as ``checkpoints/depth-anything-v2-large-hf`` (nothing is downloaded).
"""

from __future__ import annotations

import argparse

from fourdgen.backbones.depth import save_tiny_depth_anything

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder to write the checkpoint into")
    print(save_tiny_depth_anything(ap.parse_args().out))
