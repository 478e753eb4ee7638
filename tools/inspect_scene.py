"""Validate a scene folder and summarise it; optionally write a contact sheet of its grid.

    python tools/inspect_scene.py data/quickstart/scene --sheet sheet.png

Exit code 1 with the SceneFormatError message (file, field, expected value) if the scene is invalid.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from fourdgen.data.scene import SceneFormatError, read_scene
from fourdgen.geometry.cameras import camera_centers
from fourdgen.io import atomic_path


def summarize(path: str) -> str:
    s = read_scene(path)
    centers = camera_centers(s.w2c)  # [V, T, 3]
    moving = (centers - centers[:, :1]).norm(dim=-1).amax().item() > 1e-6
    lines = [
        f"{s.root}: {s.num_views} views x {s.num_frames} frames, {s.width}x{s.height}, {s.fps:g} fps",
        f"caption: {s.caption!r}",
        f"ground truth: depth={s.has_depth} xyz={s.has_xyz} mask={s.has_mask}",
        f"cameras {'move' if moving else 'static'}",
    ]
    for v, view in enumerate(s.views):
        fx, fy = s.K[v, 0, 0].item(), s.K[v, 1, 1].item()
        c = centers[v, 0].tolist()
        src = view.rgb.name if not isinstance(view.rgb, list) else f"{len(view.rgb)} images"
        centre = ", ".join(f"{x:.2f}" for x in c)
        lines.append(f"  [{v}] {view.name}: f=({fx:.1f}, {fy:.1f}) centre=({centre}) rgb={src}")
    return "\n".join(lines)


def contact_sheet(path: str, out: str, max_frames: int = 8) -> None:
    """Rows = views, columns = up to ``max_frames`` evenly spaced timesteps."""
    import imageio.v2 as iio

    s = read_scene(path)
    times = np.linspace(0, s.num_frames - 1, min(max_frames, s.num_frames)).round().astype(int).tolist()
    rows = [torch.cat(list(s.load_rgb(v, times).permute(0, 2, 3, 1)), dim=1) for v in range(s.num_views)]
    sheet = (torch.cat(rows, dim=0).numpy() * 255).round().astype(np.uint8)
    with atomic_path(out) as tmp:
        iio.imwrite(tmp, sheet)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scene")
    p.add_argument("--sheet", default=None, help="write a PNG contact sheet (views x timesteps)")
    args = p.parse_args(argv)
    try:
        print(summarize(args.scene))
        if args.sheet:
            contact_sheet(args.scene, args.sheet)
            print(f"wrote {args.sheet}")
    except SceneFormatError as e:
        print(f"invalid scene: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
