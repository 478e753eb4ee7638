"""Tests of fourdgen.geometry against hand-written references and known values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fourdgen.geometry import (
    camera_centers,
    crop_intrinsics,
    depth_to_points,
    interpolate_path,
    intrinsics_from_fov,
    invert_rigid,
    is_rigid,
    look_at,
    make_intrinsics,
    make_rigid,
    matrix_to_quaternion,
    opencv_to_opengl,
    opengl_to_opencv,
    pixel_rays,
    pointmap_to_depth,
    project,
    quaternion_to_matrix,
    rebase_cameras,
    render_pointmap_to_view,
    render_points,
    rotation_angle,
    scale_intrinsics,
    slerp,
    to_first_camera,
    unproject,
)

# ----------------------------------------------------------------------------- helpers


def random_rotation(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Uniform-ish random rotations [*shape, 3, 3] (float64) from QR with a det fix."""
    Q, Rr = torch.linalg.qr(torch.randn(*shape, 3, 3, generator=gen, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(Rr, dim1=-2, dim2=-1))[..., None, :]
    return Q * torch.linalg.det(Q).sign()[..., None, None]


def random_w2c(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Cameras about 5 units from the origin, so points near the origin are in front."""
    R = random_rotation(gen, *shape)
    t = torch.tensor([0.0, 0.0, 5.0], dtype=torch.float64) + 0.3 * torch.randn(*shape, 3, generator=gen)
    return make_rigid(R, t.double())


def rodrigues(axis, angle: float) -> torch.Tensor:
    a = torch.as_tensor(axis, dtype=torch.float64)
    a = a / a.norm()
    Kx = torch.tensor([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * Kx + (1 - math.cos(angle)) * Kx @ Kx


K_SKEW = torch.tensor([[300.0, 2.0, 161.0], [0.0, 280.0, 119.5], [0.0, 0.0, 1.0]], dtype=torch.float64)


# ----------------------------------------------------------------------------- projection


def test_project_matches_manual_pinhole():
    gen = torch.Generator().manual_seed(0)
    w2c = random_w2c(gen)
    pts = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    uv, z = project(pts, K_SKEW, w2c)
    Kn, Wn = K_SKEW.numpy(), w2c.numpy()
    for i, X in enumerate(pts.numpy()):
        Xc = Wn[:3, :3] @ X + Wn[:3, 3]
        p = Kn @ Xc
        np.testing.assert_allclose(uv[i].numpy(), p[:2] / p[2], rtol=0, atol=1e-9)
        np.testing.assert_allclose(z[i].item(), Xc[2], atol=1e-12)


def test_project_unproject_roundtrip_batched_float32():
    gen = torch.Generator().manual_seed(1)
    w2c = random_w2c(gen, 4).float()
    K = make_intrinsics(torch.tensor([200.0, 300, 250, 400]), 220.0, 128.0, 96.0)
    pts = torch.randn(4, 100, 3, generator=gen)
    uv, z = project(pts, K, w2c)
    assert uv.shape == (4, 100, 2) and z.shape == (4, 100)
    back = unproject(uv, z, K, w2c)
    assert (back - pts).abs().max() < 2e-5
    # One camera, many point sets: leading dims broadcast.
    uv0, _ = project(pts, K[0], w2c[0])
    torch.testing.assert_close(uv0[2], project(pts[2], K[0], w2c[0])[0])


def test_look_at_rigid_centre_and_orientation():
    gen = torch.Generator().manual_seed(2)
    eye = 4 * torch.randn(8, 3, generator=gen)
    target = torch.randn(8, 3, generator=gen)
    w2c = look_at(eye, target)
    assert is_rigid(w2c).all()
    torch.testing.assert_close(camera_centers(w2c), eye, atol=1e-5, rtol=0)
    K = intrinsics_from_fov(60.0, 320, 240)
    uv, z = project(target[:, None], K, w2c)
    torch.testing.assert_close(uv[:, 0], torch.tensor([160.0, 120.0]).expand(8, 2), atol=1e-3, rtol=0)
    assert (z > 0).all()
    # Known values: camera on +z looking at the origin, +y up: world +x is image right, +y is up.
    w2c = look_at(torch.tensor([0.0, 0.0, 5.0]), torch.zeros(3))
    fx = 160.0 / math.tan(math.radians(30.0))
    uv, _ = project(torch.tensor([[0.1, 0.0, 0.0], [0.0, 0.1, 0.0]]), K, w2c)
    torch.testing.assert_close(uv, torch.tensor([[160 + fx * 0.02, 120.0], [160.0, 120 - fx * 0.02]]))


def test_opencv_opengl_roundtrip_and_known_value():
    gen = torch.Generator().manual_seed(3)
    c2w = invert_rigid(random_w2c(gen, 5))
    torch.testing.assert_close(opengl_to_opencv(opencv_to_opengl(c2w)), c2w)
    gl = opencv_to_opengl(c2w)
    torch.testing.assert_close(gl[..., :3, 2], -c2w[..., :3, 2])  # GL looks down -z
    torch.testing.assert_close(gl[..., :3, 3], c2w[..., :3, 3])
    # A camera on +z looking at the origin with +y up is the identity rotation in OpenGL axes.
    c2w_cv = invert_rigid(look_at(torch.tensor([0.0, 0.0, 5.0]), torch.zeros(3)))
    expected = torch.eye(4)
    expected[2, 3] = 5.0
    torch.testing.assert_close(opencv_to_opengl(c2w_cv), expected)


def test_scale_intrinsics_scales_projections_exactly():
    gen = torch.Generator().manual_seed(4)
    w2c = random_w2c(gen)
    pts = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    uv, _ = project(pts, K_SKEW, w2c)
    uv_s, _ = project(pts, scale_intrinsics(K_SKEW, 0.5, 0.25), w2c)
    torch.testing.assert_close(uv_s, uv * torch.tensor([0.5, 0.25], dtype=torch.float64))
    # Corner-origin convention: the centred K of a half-size image is exactly half the K.
    torch.testing.assert_close(
        scale_intrinsics(intrinsics_from_fov(50.0, 640, 480), 0.5, 0.5), intrinsics_from_fov(50.0, 320, 240)
    )


def test_crop_intrinsics_shifts_and_matches_image_crop():
    gen = torch.Generator().manual_seed(5)
    w2c = random_w2c(gen)
    pts = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    uv, _ = project(pts, K_SKEW, w2c)
    uv_c, _ = project(pts, crop_intrinsics(K_SKEW, 40, 17), w2c)
    torch.testing.assert_close(uv_c, uv - torch.tensor([40.0, 17.0], dtype=torch.float64))
    # Rendering then cropping the image == rendering with cropped intrinsics.
    cols = torch.rand(30, 3, generator=gen, dtype=torch.float64)
    full, dfull, _ = render_points(pts, cols, K_SKEW, w2c, 240, 320, radius_px=2)
    crop, dcrop, _ = render_points(pts, cols, crop_intrinsics(K_SKEW, 40, 17), w2c, 100, 150, radius_px=2)
    torch.testing.assert_close(crop, full[:, 17:117, 40:190])
    torch.testing.assert_close(dcrop, dfull[17:117, 40:190])


def test_depth_to_points_known_values_and_roundtrip():
    # 2x2 image, f=2, principal point at the image centre: pixel centres at +-0.5 px -> +-0.25.
    K = make_intrinsics(2.0, 2.0, 1.0, 1.0)
    pts = depth_to_points(torch.ones(2, 2), K)
    expected = torch.tensor([[[-0.25, -0.25, 1], [0.25, -0.25, 1]], [[-0.25, 0.25, 1], [0.25, 0.25, 1]]])
    torch.testing.assert_close(pts, expected)

    gen = torch.Generator().manual_seed(6)
    H, W = 6, 8
    K = make_intrinsics(torch.tensor([7.0, 9.0]), 8.0, 4.2, 2.9).double()
    w2c = random_w2c(gen, 2)
    depth = 1 + 3 * torch.rand(2, H, W, generator=gen, dtype=torch.float64)
    xyz = depth_to_points(depth, K, w2c)
    assert xyz.shape == (2, H, W, 3)
    torch.testing.assert_close(pointmap_to_depth(xyz, w2c), depth)
    # Independent path: rays from cameras.pixel_rays.
    o, d = pixel_rays(K, invert_rigid(w2c), H, W)
    torch.testing.assert_close(xyz, o + depth[..., None] * d)
    # Each point projects back to its pixel centre.
    uv, z = project(xyz.reshape(2, H * W, 3), K, w2c)
    jj, ii = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    centres = torch.tensor(np.stack([ii + 0.5, jj + 0.5], -1).reshape(H * W, 2))
    torch.testing.assert_close(uv, centres.expand(2, -1, -1))
    torch.testing.assert_close(z, depth.reshape(2, H * W))


def test_first_camera_frame_and_rebase():
    gen = torch.Generator().manual_seed(7)
    B, T, H, W = 2, 3, 5, 4
    K = make_intrinsics(6.0, 6.0, 2.0, 2.5).double()
    w2c = random_w2c(gen, B, T)
    depth = 1 + torch.rand(B, T, H, W, generator=gen, dtype=torch.float64)
    world = depth_to_points(depth, K, w2c)  # [B, T, H, W, 3]
    first = to_first_camera(world, w2c[:, 0])
    # Frame 0 in camera 0's frame is just its camera-frame unprojection.
    torch.testing.assert_close(first[:, 0], depth_to_points(depth[:, 0], K))
    rebased = rebase_cameras(w2c, w2c[:, 0])
    torch.testing.assert_close(rebased[:, 0], torch.eye(4, dtype=torch.float64).expand(B, 4, 4))
    assert is_rigid(rebased).all()
    # Every frame unprojected with the rebased cameras lands on the same points.
    torch.testing.assert_close(depth_to_points(depth, K, rebased), first)
    # A single (unbatched) reference works for any point layout.
    torch.testing.assert_close(to_first_camera(world[1], w2c[1, 0]), first[1])
    with pytest.raises(ValueError):
        to_first_camera(world, w2c[0])


# ----------------------------------------------------------------------------- point splatting


def reference_render(pts, cols, K, w2c, H, W, r, near=1e-3):
    """Obviously-correct z-buffer: loop over points, keep the nearest (lowest index on ties)."""
    Kn, Wn, P, Cn = K.numpy(), w2c.numpy(), pts.numpy(), cols.numpy()
    img = np.zeros((H, W, Cn.shape[1]))
    zb = np.full((H, W), np.inf)
    idx = np.full((H, W), -1)
    for n, X in enumerate(P):
        Xc = Wn[:3, :3] @ X + Wn[:3, 3]
        if Xc[2] <= near:
            continue
        p = Kn @ Xc
        ci, cj = int(np.floor(p[0] / p[2])), int(np.floor(p[1] / p[2]))
        for j in range(cj - r, cj + r + 1):
            for i in range(ci - r, ci + r + 1):
                if 0 <= i < W and 0 <= j < H and Xc[2] < zb[j, i]:
                    zb[j, i], idx[j, i], img[j, i] = Xc[2], n, Cn[n]
    mask = idx >= 0
    return img.transpose(2, 0, 1), np.where(mask, zb, 0.0), mask


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_render_points_matches_reference(radius):
    gen = torch.Generator().manual_seed(10 + radius)
    H, W = 13, 17
    K = make_intrinsics(9.0, 7.5, 8.3, 6.1).double()
    w2c = random_w2c(gen)
    pts = 1.5 * torch.randn(40, 3, generator=gen, dtype=torch.float64)
    pts[5] = camera_centers(w2c) + 0.1 * torch.randn(3, generator=gen, dtype=torch.float64)  # ~behind
    pts[20:25] = pts[10:15]  # exact ties: the lower index must win
    cols = torch.rand(40, 4, generator=gen, dtype=torch.float64)
    img, depth, mask = render_points(pts, cols, K, w2c, H, W, radius_px=radius)
    ref_img, ref_depth, ref_mask = reference_render(pts, cols, K, w2c, H, W, radius)
    assert img.shape == (4, H, W) and depth.shape == (H, W) and mask.dtype == torch.bool
    np.testing.assert_array_equal(mask.numpy(), ref_mask)
    np.testing.assert_array_equal(img.numpy(), ref_img)
    np.testing.assert_allclose(depth.numpy(), ref_depth, rtol=0, atol=1e-12)  # same winner, same z
    assert 0 < ref_mask.sum() < H * W  # the test exercises both covered and empty pixels


def test_render_points_occlusion_background_and_batch():
    K = make_intrinsics(10.0, 10.0, 4.0, 4.0)
    near_far = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 5.0]])
    red_blue = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    for perm in ([0, 1], [1, 0]):
        img, depth, mask = render_points(
            near_far[perm], red_blue[perm], K, None, 8, 8, radius_px=0, background=0.5
        )
        assert mask.sum() == 1 and mask[4, 4]
        torch.testing.assert_close(img[:, 4, 4], torch.tensor([1.0, 0.0, 0.0]))
        assert depth[4, 4] == 2.0 and depth[0, 0] == 0.0
        assert (img[:, 0, 0] == 0.5).all()
    # A batch of cameras equals separate renders; `valid` drops points.
    gen = torch.Generator().manual_seed(11)
    pts = torch.randn(200, 3, generator=gen)
    cols = torch.rand(200, 3, generator=gen)
    w2c = random_w2c(gen, 3).float()
    valid = torch.rand(200, generator=gen) > 0.3
    img, depth, mask = render_points(pts, cols, K, w2c, 8, 8, valid=valid)
    for b in range(3):
        ib, db, mb = render_points(pts[valid], cols[valid], K, w2c[b], 8, 8)
        torch.testing.assert_close(img[b], ib)
        torch.testing.assert_close(depth[b], db)
        assert torch.equal(mask[b], mb)


def test_render_pointmap_to_own_view_reproduces_image():
    gen = torch.Generator().manual_seed(12)
    H, W = 12, 16
    K = make_intrinsics(14.0, 14.0, 8.0, 6.0).double()
    w2c = random_w2c(gen)
    depth = 2 + torch.rand(H, W, generator=gen, dtype=torch.float64)
    rgb = torch.rand(3, H, W, generator=gen, dtype=torch.float64)
    img, d, mask = render_pointmap_to_view(depth_to_points(depth, K, w2c), rgb, K, w2c, H, W, radius_px=0)
    assert mask.all()
    torch.testing.assert_close(img, rgb)
    torch.testing.assert_close(d, depth)
    valid = torch.ones(H, W, dtype=torch.bool)
    valid[3, 5] = False
    _, _, mask = render_pointmap_to_view(depth_to_points(depth, K, w2c), rgb, K, w2c, H, W, valid, 0)
    assert not mask[3, 5] and mask.sum() == H * W - 1


# ----------------------------------------------------------------------------- rotations


def test_quaternion_matrix_roundtrip_and_known_value():
    q = torch.tensor([math.cos(math.pi / 4), 0, 0, math.sin(math.pi / 4)], dtype=torch.float64)
    Rz = torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(quaternion_to_matrix(q), Rz)
    torch.testing.assert_close(matrix_to_quaternion(Rz), q)
    gen = torch.Generator().manual_seed(20)
    R = random_rotation(gen, 500)
    R[0] = rodrigues([1.0, 2.0, -0.5], math.pi)  # 180 degrees: w = 0, the hard case
    R[1] = rodrigues([0.3, -1.0, 0.2], math.pi - 1e-7)
    q = matrix_to_quaternion(R)
    assert (q[:, 0] >= 0).all()
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(500, dtype=torch.float64))
    torch.testing.assert_close(quaternion_to_matrix(q), R, atol=1e-10, rtol=0)
    torch.testing.assert_close(rotation_angle(R[:2]), torch.tensor([math.pi, math.pi - 1e-7], dtype=R.dtype))


def test_slerp_midpoint_half_angle_and_shortest_path():
    gen = torch.Generator().manual_seed(21)
    R0 = random_rotation(gen)
    axis, angle = [0.2, -0.7, 0.4], 2.2
    R1 = R0 @ rodrigues(axis, angle)
    q0, q1 = matrix_to_quaternion(R0), matrix_to_quaternion(R1)
    for t in (0.0, 0.25, 0.5, 1.0):
        Rt = quaternion_to_matrix(slerp(q0, q1, t))
        torch.testing.assert_close(Rt, R0 @ rodrigues(axis, t * angle))
    # -q1 is the same rotation: still the short way round, not the 2*pi - angle way.
    torch.testing.assert_close(quaternion_to_matrix(slerp(q0, -q1, 0.5)), R0 @ rodrigues(axis, angle / 2))
    # Nearly identical rotations fall back to lerp without NaNs.
    assert torch.isfinite(slerp(q0, q0, torch.tensor([0.3, 0.7]))).all()


# ----------------------------------------------------------------------------- interpolation


def orbit_keys(angles, up_axis=1):
    """Key cameras at azimuths ``angles`` (right-handed about +y from +z) looking near the origin."""
    a = torch.tensor(angles, dtype=torch.float64)
    r = 3 + 0.4 * torch.sin(3 * a)
    h = 0.5 + 0.3 * torch.cos(2 * a)
    eyes = torch.stack([r * torch.sin(a), h, r * torch.cos(a)], -1)
    targets = 0.1 * torch.stack([torch.cos(a), torch.sin(a), torch.zeros_like(a)], -1)
    return look_at(eyes, targets), a


def test_loop_passes_through_keys_sorted_and_closes():
    w2c, a = orbit_keys([0.3, 2.9, -2.5, 1.5, -0.2, -1.0])
    M = 120
    path, order = interpolate_path(w2c, M, center=torch.zeros(3))
    assert path.shape == (M, 4, 4)
    assert order.tolist() == torch.argsort(a).tolist()  # [-2.5, -1.0, -0.2, 0.3, 1.5, 2.9]
    torch.testing.assert_close(path[:: M // 6], w2c[order], atol=2e-5, rtol=0)
    assert is_rigid(path).all()
    C = camera_centers(path.double())
    steps = (torch.roll(C, -1, 0) - C).norm(dim=-1)  # includes the closing step M-1 -> 0
    length = steps.sum()
    assert length > 2 * math.pi * 2.5  # it really orbits
    assert steps.max() < 2.5 * length / M  # continuous, no jumps, closing step included
    R = path[:, :3, :3].double()
    dR = rotation_angle(torch.roll(R, -1, 0) @ R.transpose(-1, -2))
    assert dR.max() < 0.2
    # Shuffled input, same path; the default centre (mean of centres) gives the same order here.
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    path2, order2 = interpolate_path(w2c[perm], M, center=torch.zeros(3))
    torch.testing.assert_close(path2, path)
    assert perm[order2].tolist() == order.tolist()
    _, order3 = interpolate_path(w2c[perm], M)
    assert perm[order3].tolist() == order.tolist()


def test_open_arc_across_the_seam_and_up_axis():
    w2c, _ = orbit_keys([3.0, -2.5, 2.5, -3.0])  # an arc around azimuth pi
    path, order = interpolate_path(w2c, 31, closed=False, center=torch.zeros(3))
    assert order.tolist() == [2, 0, 3, 1]  # 2.5, 3.0, -3.0 (= 3.28), -2.5 (= 3.78)
    torch.testing.assert_close(path[0], w2c[2], atol=2e-5, rtol=0)
    torch.testing.assert_close(path[-1], w2c[1], atol=2e-5, rtol=0)
    torch.testing.assert_close(path[10], w2c[0], atol=2e-5, rtol=0)
    assert is_rigid(path).all()
    C = camera_centers(path.double())
    assert (C[:, 2] < 0).all()  # stays on the far side, never cuts through azimuth 0
    # z-up world: azimuth is atan2(y, x).
    b = torch.tensor([2.0, -1.0, 0.5])
    eyes = torch.stack([3 * torch.cos(b), 3 * torch.sin(b), torch.zeros(3)], -1)
    w2c_z = look_at(eyes, torch.zeros(3, 3), up=torch.tensor([0.0, 0.0, 1.0]))
    _, order = interpolate_path(w2c_z, 12, up=torch.tensor([0.0, 0.0, 1.0]), center=torch.zeros(3))
    assert order.tolist() == [1, 2, 0]


def test_focus_point_of_a_rig():
    from fourdgen.geometry.cameras import focus_point, look_at

    target = torch.tensor([0.3, -0.4, 1.2])
    ang = torch.linspace(0, 2.5, 5)
    eyes = target + torch.stack([3 * torch.sin(ang), torch.full_like(ang, 1.0), -3 * torch.cos(ang)], -1)
    w2c = look_at(eyes, target.expand_as(eyes))
    torch.testing.assert_close(focus_point(w2c), target, atol=1e-4, rtol=0)
