"""Procedural dynamic 4D scenes with exact ground truth (cameras, depth, pointmaps, masks).

The world is y-up. A textured dome (background) and a checkered ground plane surround a few
objects (spheres, boxes, a deforming ellipsoid) that translate, rotate and deform over time.
Textures live in object-local coordinates, so they move with the objects: a model that fits
these scenes must learn real motion. Images are ray-cast analytically: depth, pointmaps and
object masks are exact at pixel centres (RGB is optionally supersampled for anti-aliasing).

Hand-written because no library renders analytic scenes with exact depth on CPU in torch.

Command line: ``fourdgen-synth --out scenes/demo --scene.num_views 4 --scene.num_frames 8``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from fourdgen.errors import ConfigError
from fourdgen.geometry.cameras import intrinsics_from_fov, invert_rigid, look_at, pixel_rays, scale_intrinsics
from fourdgen.geometry.rotations import axis_angle_to_matrix

_EPS = 1e-4
_LIGHT = F.normalize(torch.tensor([0.4, 1.0, 0.3]), dim=0)
KINDS = ("sphere", "box", "ellipsoid")


@dataclass
class SyntheticConfig:
    """What to generate. Deterministic for a given config (``seed`` included)."""

    num_views: int = 4
    num_frames: int = 8
    height: int = 64
    width: int = 64
    num_objects: int = 3
    layout: str = "orbit"  # "orbit": views evenly on a full circle; "arc": spread over arc_degrees
    arc_degrees: float = 90.0
    radius: float = 4.0  # camera distance from the scene centre
    elevation_deg: float = 20.0
    fov_deg: float = 50.0  # horizontal field of view
    camera_drift_deg: float = 0.0  # per-frame azimuth drift of every camera (moving cameras)
    motion_scale: float = 1.0  # scales translation, rotation and deformation amplitudes
    fps: float = 8.0
    supersample: int = 2  # RGB anti-aliasing: s x s rays per pixel (depth/xyz use the centre ray)
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse impossible scenes with the field's name (a raw torch error would name nothing)."""
        positive = ("num_views", "num_frames", "height", "width", "supersample")
        checks = [
            (k, "an integer >= 1", isinstance(getattr(self, k), int) and getattr(self, k) >= 1)
            for k in positive
        ]
        checks += [
            ("num_objects", "an integer >= 0", isinstance(self.num_objects, int) and self.num_objects >= 0),
            ("layout", "'orbit' or 'arc'", self.layout in ("orbit", "arc")),
            ("radius", "a number > 0", self.radius > 0),
            ("fov_deg", "a number in (0, 180)", 0 < self.fov_deg < 180),
            ("elevation_deg", "a number in (-90, 90)", -90 < self.elevation_deg < 90),
            ("fps", "a number > 0", self.fps > 0),
        ]
        for name, expected, ok in checks:
            if not ok:
                raise ConfigError(f"synthetic.{name}: expected {expected}, got {getattr(self, name)!r}")


@dataclass
class ObjectSpec:
    kind: str
    center: Tensor  # [3] rest position
    size: Tensor  # [3] radii / half extents
    color: Tensor  # [3] base colour
    tex_freq: Tensor  # [3, 3] texture frequency vectors (one per colour channel)
    tex_phase: Tensor  # [3]
    move: Tensor  # [3] translation amplitude
    move_phase: float
    spin_axis: Tensor  # [3] unit
    spin: float  # radians over the clip
    deform: float  # relative radius pulsation amplitude (ellipsoids)

    def to(self, device: torch.device | str) -> ObjectSpec:
        return replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in fields(self)
                if isinstance(getattr(self, f.name), Tensor)
            },
        )


@dataclass
class SyntheticScene:
    """Ground truth of one generated scene. Shapes: V views, T timesteps, H x W pixels."""

    rgb: Tensor  # [V, T, H, W, 3] float in [0, 1]
    depth: Tensor  # [V, T, H, W] z-depth
    xyz: Tensor  # [V, T, H, W, 3] world points
    mask: Tensor  # [V, T, H, W] uint8: 0 background (dome, ground), i = object i
    K: Tensor  # [V, 3, 3]
    w2c: Tensor  # [V, T, 4, 4]
    times: Tensor  # [T] normalised time in [0, 1]
    objects: list[ObjectSpec]
    config: SyntheticConfig
    caption: str = ""
    centers: Tensor = field(default_factory=lambda: torch.zeros(0))  # [num_objects, T, 3]

    def write(self, root: str | Path, frame_format: str = "png") -> Path:
        """Write in the scene format (see :mod:`fourdgen.data.scene`)."""
        from fourdgen.data.scene_writer import write_scene

        return write_scene(
            root,
            self.rgb,
            self.K,
            self.w2c,
            depth=self.depth,
            xyz=self.xyz,
            mask=self.mask,
            fps=self.config.fps,
            caption=self.caption,
            frame_format=frame_format,
            extra={"synthetic": asdict(self.config)},
        )


def _rand(g: torch.Generator, *shape: int, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    return lo + (hi - lo) * torch.rand(*shape, generator=g)


def make_objects(cfg: SyntheticConfig) -> list[ObjectSpec]:
    """Random but deterministic objects placed around the origin, resting above the ground."""
    g = torch.Generator().manual_seed(cfg.seed)
    objs = []
    for i in range(cfg.num_objects):
        kind = KINDS[i % len(KINDS)]
        size = _rand(g, 3, lo=0.35, hi=0.6)
        if kind == "sphere":
            size = size[:1].expand(3).clone()
        ang = 2 * math.pi * (i + _rand(g, 1).item() * 0.5) / max(cfg.num_objects, 1)
        ring = 0.9 if cfg.num_objects > 1 else 0.0
        center = torch.tensor([ring * math.cos(ang), -1.0 + float(size[1]) + 0.15, ring * math.sin(ang)])
        axis = F.normalize(torch.randn(3, generator=g), dim=0)
        objs.append(
            ObjectSpec(
                kind=kind,
                center=center,
                size=size,
                color=0.4 + 0.6 * _rand(g, 3),
                tex_freq=torch.randn(3, 3, generator=g) * 6.0,
                tex_phase=_rand(g, 3, hi=2 * math.pi),
                move=cfg.motion_scale * _rand(g, 3, lo=-0.6, hi=0.6) * torch.tensor([1.0, 0.4, 1.0]),
                move_phase=float(_rand(g, 1, hi=2 * math.pi)),
                spin_axis=axis,
                spin=cfg.motion_scale * float(_rand(g, 1, lo=0.8, hi=2.0)),
                deform=cfg.motion_scale * (0.3 if kind == "ellipsoid" else 0.0),
            )
        )
    return objs


def object_state(obj: ObjectSpec, t: float) -> tuple[Tensor, Tensor, Tensor]:
    """(centre [3], rotation [3, 3] local->world, size [3]) at normalised time ``t`` in [0, 1]."""
    w = 1.5 * math.pi * t  # 3/4 of a cycle: no two frames of the clip coincide
    offset = obj.move * torch.tensor(
        [
            math.sin(w + obj.move_phase),
            abs(math.sin(w + obj.move_phase)),
            math.cos(w + obj.move_phase) - math.cos(obj.move_phase),
        ],
        device=obj.move.device,
    )
    R = axis_angle_to_matrix(obj.spin_axis * (obj.spin * t))
    pulse = obj.deform * math.sin(w)
    size = obj.size * torch.tensor([1 + pulse, 1 - 0.5 * pulse, 1 + pulse], device=obj.size.device)
    return obj.center + offset, R, size


def _texture(u: Tensor, freq: Tensor, phase: Tensor, color: Tensor) -> Tensor:
    """Colourful stripes times a checkerboard on local coordinates ``u [N, 3]`` -> ``[N, 3]``."""
    stripes = 0.5 + 0.5 * torch.sin(u @ freq.T + phase)
    checker = ((torch.floor(u * 3.0).sum(-1) % 2) * 0.4 + 0.6)[:, None]
    return (color * (0.45 + 0.55 * stripes) * checker).clamp(0, 1)


def _hit_quadric_or_box(kind: str, o: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Front-hit parameter ``s [N]`` (inf if none) and local normal ``[N, 3]`` for the unit sphere
    or the cube [-1, 1]^3, rays ``o + s d`` in local (scaled) coordinates."""
    if kind == "box":
        inv = 1.0 / torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
        t1, t2 = (-1 - o) * inv, (1 - o) * inv
        tmin, tmax = torch.minimum(t1, t2).amax(-1), torch.maximum(t1, t2).amin(-1)
        s = torch.where((tmax >= tmin) & (tmin > _EPS), tmin, torch.full_like(tmin, math.inf))
        p = o + s.nan_to_num(posinf=0)[:, None] * d
        axis = p.abs().argmax(-1)
        n = F.one_hot(axis, 3).to(p) * torch.sign(p.gather(1, axis[:, None]))
        return s, n
    a, b, c = (d * d).sum(-1), 2 * (o * d).sum(-1), (o * o).sum(-1) - 1
    disc = b * b - 4 * a * c
    s = (-b - disc.clamp_min(0).sqrt()) / (2 * a)
    s = torch.where((disc >= 0) & (s > _EPS), s, torch.full_like(s, math.inf))
    return s, o + s.nan_to_num(posinf=0)[:, None] * d


def render_rays(
    objects: list[ObjectSpec],
    t: float,
    o: Tensor,
    d: Tensor,
    dome_radius: float = 12.0,
    ground_y: float = -1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Ray-cast the scene at time ``t``. ``o, d [N, 3]`` world rays (``d`` with unit camera-z, so
    the ray parameter is the z-depth). Returns ``rgb [N, 3]``, ``depth [N]``, ``ids [N]``."""
    N = o.shape[0]
    light = _LIGHT.to(o.device)
    # Dome: camera is inside, take the far root.
    a, b, c = (d * d).sum(-1), 2 * (o * d).sum(-1), (o * o).sum(-1) - dome_radius**2
    depth = (-b + (b * b - 4 * a * c).clamp_min(0).sqrt()) / (2 * a)
    p = o + depth[:, None] * d
    dirn = F.normalize(p, dim=-1)
    az, el = torch.atan2(dirn[:, 0], dirn[:, 2]), torch.asin(dirn[:, 1].clamp(-1, 1))
    sky = torch.stack([0.55 + 0.25 * el, 0.65 + 0.2 * torch.sin(3 * az), 0.85 - 0.2 * el], -1)
    band = ((torch.floor(az * 12 / math.pi) + torch.floor(el * 12 / math.pi)) % 2)[:, None]
    rgb = (sky * (0.8 + 0.2 * band)).clamp(0, 1)
    ids = torch.zeros(N, dtype=torch.uint8, device=o.device)

    # Ground plane y = ground_y: checkerboard with a tint gradient.
    s = (ground_y - o[:, 1]) / torch.where(d[:, 1].abs() < 1e-12, torch.full_like(d[:, 1], -1e-12), d[:, 1])
    hit = (s > _EPS) & (s < depth)
    if hit.any():
        q = o[hit] + s[hit, None] * d[hit]
        chk = (torch.floor(q[:, 0] * 2) + torch.floor(q[:, 2] * 2)) % 2
        base = torch.stack(
            [
                0.55 + 0.1 * torch.sin(q[:, 0]),
                0.5 + 0.1 * torch.cos(q[:, 2]),
                0.4 + 0.05 * q[:, 0].sin() * q[:, 2].cos(),
            ],
            -1,
        )
        col = base * (0.55 + 0.45 * chk[:, None]) * (0.35 + 0.65 * light[1])
        depth, rgb = torch.where(hit, s, depth), rgb.clone()
        rgb[hit] = col

    for i, obj in enumerate(objects, start=1):
        center, R, size = object_state(obj, t)
        ol = ((o - center) @ R) / size  # world -> local (rotate by R^T, then unit-scale)
        dl = (d @ R) / size
        s, n_local = _hit_quadric_or_box(obj.kind, ol, dl)
        hit = s < depth
        if not hit.any():
            continue
        u = (ol[hit] + s[hit, None] * dl[hit]) * size  # local, unscaled: texture stretches on deform
        n_world = F.normalize((n_local[hit] / size) @ R.T, dim=-1)
        shade = 0.35 + 0.65 * (n_world @ light).clamp_min(0)
        depth = torch.where(hit, s, depth)
        rgb[hit] = _texture(u, obj.tex_freq, obj.tex_phase, obj.color) * shade[:, None]
        ids[hit] = i
    return rgb, depth, ids


def make_cameras(cfg: SyntheticConfig) -> tuple[Tensor, Tensor]:
    """``K [V, 3, 3]`` and ``w2c [V, T, 4, 4]`` on an orbit or arc around the scene centre."""
    V, T = cfg.num_views, cfg.num_frames
    if cfg.layout == "orbit":
        az = torch.arange(V) * (2 * math.pi / V)
    elif cfg.layout == "arc":
        az = torch.linspace(-0.5, 0.5, V) * math.radians(cfg.arc_degrees) if V > 1 else torch.zeros(1)
    else:
        raise ValueError(f"SyntheticConfig.layout: expected 'orbit' or 'arc', got {cfg.layout!r}")
    az = az[:, None] + torch.arange(T)[None] * math.radians(cfg.camera_drift_deg)  # [V, T]
    el = math.radians(cfg.elevation_deg)
    target = torch.tensor([0.0, -0.4, 0.0])
    eye = target + cfg.radius * torch.stack(
        [math.cos(el) * torch.sin(az), torch.full_like(az, math.sin(el)), -math.cos(el) * torch.cos(az)], -1
    )
    w2c = look_at(eye, target.expand_as(eye))
    K = intrinsics_from_fov(cfg.fov_deg, cfg.width, cfg.height).expand(V, 3, 3).clone()
    return K, w2c


def describe(objects: list[ObjectSpec]) -> str:
    names = {"sphere": "a textured ball", "box": "a spinning patterned box", "ellipsoid": "a pulsing blob"}
    return ", ".join(names[o.kind] for o in objects) + " moving over a checkered floor"


def render_view(
    objects: list[ObjectSpec],
    K: Tensor,
    w2c: Tensor,
    times: Tensor,
    height: int,
    width: int,
    supersample: int = 1,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Ray-cast one camera at every time: ``K [3, 3]``, ``w2c [T, 4, 4]``, ``times [T]`` ->
    ``rgb [T, H, W, 3]`` in [0, 1], ``depth [T, H, W]``, ``xyz [T, H, W, 3]``, ``mask [T, H, W]``
    (on the CPU). ``device``: where the rays are cast (default ``K``'s); a CUDA device renders a
    paper-size scene in seconds instead of minutes."""
    H, W, s = height, width, supersample
    T = len(times)
    device = torch.device(device) if device is not None else K.device
    K, objects = K.to(device), [ob.to(device) for ob in objects]
    c2w = invert_rigid(w2c.to(device))
    rgb, depth, xyz = torch.zeros(T, H, W, 3), torch.zeros(T, H, W), torch.zeros(T, H, W, 3)
    mask = torch.zeros(T, H, W, dtype=torch.uint8)
    for ti in range(T):
        t = float(times[ti])
        o, d = pixel_rays(K, c2w[ti], H, W)
        col, dep, ids = render_rays(objects, t, o.reshape(-1, 3), d.reshape(-1, 3))
        depth[ti], mask[ti] = dep.reshape(H, W).cpu(), ids.reshape(H, W).cpu()
        xyz[ti] = (o.reshape(-1, 3) + dep[:, None] * d.reshape(-1, 3)).reshape(H, W, 3).cpu()
        if s > 1:  # s x s sub-pixel rays = pixel centres of an s-times larger image
            o2, d2 = pixel_rays(scale_intrinsics(K, s, s), c2w[ti], H * s, W * s)
            col = render_rays(objects, t, o2.reshape(-1, 3), d2.reshape(-1, 3))[0]
            col = F.avg_pool2d(col.reshape(H * s, W * s, 3).permute(2, 0, 1)[None], s)[0].permute(1, 2, 0)
        rgb[ti] = col.reshape(H, W, 3).cpu()
    return rgb, depth, xyz, mask


def render_camera(scene: SyntheticScene, K: Tensor, w2c: Tensor) -> Tensor:
    """The ground truth of ``scene`` seen from any camera (``K [3, 3]``, ``w2c [4, 4]`` or
    ``[T, 4, 4]``) at the scene's times: ``rgb [T, H, W, 3]`` in [0, 1] (novel-view references)."""
    T = len(scene.times)
    w2c = w2c.expand(T, 4, 4) if w2c.ndim == 2 else w2c
    cfg = scene.config
    return render_view(
        scene.objects, K.float(), w2c.float(), scene.times, cfg.height, cfg.width, cfg.supersample
    )[0]


def make_scene(
    cfg: SyntheticConfig | None = None, device: torch.device | str | None = None
) -> SyntheticScene:
    """Render a scene for ``cfg``: every view at every timestep, ray-cast on ``device`` (default:
    CUDA where there is one, else the CPU; the tensors returned are on the CPU either way)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    cfg = cfg or SyntheticConfig()
    objects = make_objects(cfg)
    K, w2c = make_cameras(cfg)
    times = torch.linspace(0, 1, cfg.num_frames) if cfg.num_frames > 1 else torch.zeros(1)
    views = [
        render_view(objects, K[v], w2c[v], times, cfg.height, cfg.width, cfg.supersample, device)
        for v in range(cfg.num_views)
    ]
    rgb, depth, xyz, mask = (torch.stack(x) for x in zip(*views, strict=True))
    centers = (
        torch.stack([torch.stack([object_state(ob, float(t))[0] for t in times]) for ob in objects])
        if objects
        else torch.zeros(0, cfg.num_frames, 3)
    )
    return SyntheticScene(
        rgb=rgb,
        depth=depth,
        xyz=xyz,
        mask=mask,
        K=K,
        w2c=w2c,
        times=times,
        objects=objects,
        config=cfg,
        caption=describe(objects),
        centers=centers,
    )


MARKER = ".fourdgen-synthetic.json"


def ensure_scene(root: str | Path, cfg: SyntheticConfig | None = None, frame_format: str = "png") -> Path:
    """Write the scene for ``cfg`` at ``root`` unless fourdgen already wrote that same scene there.

    Only a missing or empty folder is written to; the scene goes to a temporary sibling first and is
    renamed into place with its marker, so an interrupted write leaves nothing half-done. A folder
    holding anything else (a user's scene, a malformed one, another synthetic config) is refused
    with :class:`OutputExistsError`: the built-in default never replaces data.
    """
    import json
    import shutil
    import tempfile

    from fourdgen.errors import OutputExistsError

    cfg = cfg or SyntheticConfig()
    want = {**asdict(cfg), "frame_format": frame_format}
    root = Path(root)
    if root.is_dir() and any(root.iterdir()):
        try:
            marker = json.loads((root / MARKER).read_text())
        except (OSError, ValueError):
            marker = None
        if marker is None:  # scenes written before the marker existed carry the config in scene.json
            try:
                legacy = json.loads((root / "scene.json").read_text()).get("synthetic")
            except (OSError, ValueError, AttributeError):
                legacy = None
            marker = None if legacy is None else {**legacy, "frame_format": frame_format}
        if marker == want and (root / "scene.json").is_file():
            return root
        what = (
            "a different synthetic scene"
            if isinstance(marker, dict)
            else "data that fourdgen did not generate for this config"
        )
        if isinstance(marker, dict):
            diff = {k: (marker.get(k), v) for k, v in want.items() if marker.get(k) != v}
            what += " (" + ", ".join(f"{k}: {a!r} there, {b!r} asked" for k, (a, b) in diff.items()) + ")"
        raise OutputExistsError(
            f"{root}: holds {what}; the synthetic default writes only into a missing or empty folder, "
            "so it was left untouched. Point the scene path elsewhere, or drop `synthetic:` to train on "
            "the scene that is there."
        )
    if root.exists() and not root.is_dir():
        raise OutputExistsError(f"{root}: is a file; the synthetic scene needs a folder there")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.tmp-"))
    try:
        make_scene(cfg).write(tmp, frame_format=frame_format)
        (tmp / MARKER).write_text(json.dumps(want, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
        tmp.rename(root)  # atomic; replaces a missing or empty folder only
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def generate(
    out: str = "data/synthetic/scene",
    scene: SyntheticConfig = SyntheticConfig(),  # noqa: B008
    frame_format: str = "png",
) -> None:
    """Write a synthetic 4D scene to ``out`` in the scene format.

    Args:
        out: output scene folder.
        scene: what to generate.
        frame_format: png, jpg or mp4.
    """
    path = make_scene(scene).write(out, frame_format=frame_format)
    print(f"wrote {path / 'scene.json'}")


def main(args: list[str] | None = None) -> None:
    from jsonargparse import auto_cli

    from fourdgen.entry import run_entry

    run_entry(lambda argv: auto_cli(generate, args=argv), args)


if __name__ == "__main__":
    main()
