"""Save a tiny random Depth Anything checkpoint (model + image processor) for CPU runs of the
Full-4D pipeline (lightning_configs/pipelines/tiny/video_to_4d_gaussians.yaml) and its tests:

    python tools/tiny_depth_model.py outputs/tiny_depth

Random weights: its depth means nothing; it exercises the same loading code as Depth Anything V2
(transformers' ``depth_anything`` model type, DPT image processor). The real model is a local
folder such as ``checkpoints/depth-anything-v2-large-hf`` (nothing is downloaded).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor


def save_tiny_depth_model(root: str | Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint into ``root``; returns it."""
    backbone = Dinov2Config(  # 4 layers: the neck reads 4 distinct stages
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=14,
        image_size=42,
        out_indices=[1, 2, 3, 4],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 8, 16, 16],
        fusion_hidden_size=16,
        head_hidden_size=8,
        initializer_range=0.05,  # large enough for the output to vary with the image
    )
    torch.manual_seed(seed)
    model = DepthAnythingForDepthEstimation(config).eval()
    with torch.no_grad():  # a positive offset: the relative head's final ReLU would zero half the pixels
        model.head.conv3.bias.fill_(1e-3)
    model.save_pretrained(root)
    DPTImageProcessor(  # Depth Anything V2's processor settings, at 42 px instead of 518
        size={"height": 42, "width": 42},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(root)
    return Path(root)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder to write the checkpoint into")
    print(save_tiny_depth_model(ap.parse_args().out))
