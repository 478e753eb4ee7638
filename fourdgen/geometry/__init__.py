"""Geometry: the camera convention (:mod:`.cameras`), projection, point splatting, rotations and
camera-path interpolation. Point-set alignment lives in :mod:`.align` (imported explicitly)."""

from .cameras import (
    camera_centers,
    crop_intrinsics,
    intrinsics_from_fov,
    invert_rigid,
    is_rigid,
    look_at,
    make_intrinsics,
    make_rigid,
    opencv_to_opengl,
    opengl_to_opencv,
    pixel_centers,
    pixel_rays,
    scale_intrinsics,
)
from .interpolation import camera_azimuths, interpolate_loop, interpolate_path, sort_by_azimuth
from .pointcloud import render_pointmap_to_view, render_points
from .projection import (
    depth_to_points,
    pointmap_to_depth,
    points_to_depth,
    project,
    rebase_cameras,
    reprojection_error,
    to_first_camera,
    transform_points,
    unproject,
)
from .rotations import (
    matrix_to_quaternion,
    quaternion_multiply,
    quaternion_to_matrix,
    rotation_angle,
    slerp,
    standardize_quaternion,
)

__all__ = [
    # cameras
    "camera_centers",
    "crop_intrinsics",
    "intrinsics_from_fov",
    "invert_rigid",
    "is_rigid",
    "look_at",
    "make_intrinsics",
    "make_rigid",
    "opencv_to_opengl",
    "opengl_to_opencv",
    "pixel_centers",
    "pixel_rays",
    "scale_intrinsics",
    # projection
    "depth_to_points",
    "pointmap_to_depth",
    "points_to_depth",
    "project",
    "rebase_cameras",
    "reprojection_error",
    "to_first_camera",
    "transform_points",
    "unproject",
    # pointcloud
    "render_pointmap_to_view",
    "render_points",
    # rotations
    "matrix_to_quaternion",
    "quaternion_multiply",
    "quaternion_to_matrix",
    "rotation_angle",
    "slerp",
    "standardize_quaternion",
    # interpolation
    "camera_azimuths",
    "interpolate_loop",
    "interpolate_path",
    "sort_by_azimuth",
]
