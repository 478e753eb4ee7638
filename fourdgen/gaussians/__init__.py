"""3D Gaussians: container, rasterization (gsplat CUDA or pure torch) and 3DGS PLY files."""

from fourdgen.gaussians.container import (
    SH_C0,
    Gaussians,
    knn_mean_distance,
    num_sh_bases,
    rgb_to_sh0,
    sh0_to_rgb,
    sh_degree_from_bases,
)
from fourdgen.gaussians.ply import load_ply, load_ply_sequence, save_ply, save_ply_sequence
from fourdgen.gaussians.rasterize import RenderOutput, project_gaussians, rasterize

__all__ = [
    "SH_C0",
    "Gaussians",
    "RenderOutput",
    "knn_mean_distance",
    "load_ply",
    "load_ply_sequence",
    "num_sh_bases",
    "project_gaussians",
    "rasterize",
    "rgb_to_sh0",
    "save_ply",
    "save_ply_sequence",
    "sh0_to_rgb",
    "sh_degree_from_bases",
]
