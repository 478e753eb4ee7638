"""Evaluation metrics: images (PSNR/SSIM/LPIPS), depth (AbsRel/delta1), cameras (ATE/RPE)."""

from fourdgen.metrics.camera import ate, camera_metrics, rotation_angle, rpe
from fourdgen.metrics.depth import (
    abs_rel,
    align_depth_median,
    align_depth_scale_shift,
    delta_acc,
    depth_metrics,
)
from fourdgen.metrics.image import (
    LPIPS,
    ImageMetrics,
    build_lpips_net,
    load_lpips_backbone,
    pooled_psnr,
    psnr,
    ssim,
)

__all__ = [
    "LPIPS",
    "ImageMetrics",
    "abs_rel",
    "align_depth_median",
    "align_depth_scale_shift",
    "ate",
    "build_lpips_net",
    "camera_metrics",
    "delta_acc",
    "depth_metrics",
    "load_lpips_backbone",
    "pooled_psnr",
    "psnr",
    "rotation_angle",
    "rpe",
    "ssim",
]
