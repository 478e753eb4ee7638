"""What each stage needs from a DataModule: the one place that says it, checked before training.

Any ``LightningDataModule`` plugs in (``--data.class_path my_pkg.MyDataModule``) when it has the
methods of its stage's protocol below. Its loaders yield :class:`~fourdgen.batch.GridBatch`
(or a dict with the same names, which ``GridBatch.coerce`` accepts).

- ``VideoDiffusion``, ``GridDiffusion``, ``FeedForwardReconstruction``: :class:`GridBatchSource`,
  ``train_dataloader()`` (and ``val_/test_/predict_dataloader()`` for those loops).
- ``Gaussian4DFitter``: :class:`SceneSource`, the above and ``scene_info() -> SceneInfo``; with
  flow-matching distillation also ``view_clip(view) -> {"rgb" [T, 3, H, W] in [0, 1], "depth"
  [T, H, W] or None}`` (:class:`SourceClipSource`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

from fourdgen.errors import ConfigError


@dataclass
class SceneInfo:
    """Everything the fitter needs up front. ``K [V, 3, 3]``, ``w2c [V, T, 4, 4]``, ``times [T]``
    in [0, 1], ``points [N, 3]`` / ``colors [N, 3]`` in [0, 1] (None when the scene has no
    depth/xyz: the fitter then starts from random points in the training frusta). ``source_view``:
    the row that is the input video of a generated grid (scene.json ``source_view``; None if not
    stated). ``point_times [N]``: the normalised time each initial point was observed at (None
    when they all come from one frame); ``point_static [N]`` bool: the points classified as not
    moving over the clip (None when not classified)."""

    K: Tensor
    w2c: Tensor
    times: Tensor
    height: int
    width: int
    train_views: list[int]
    holdout_views: list[int]
    points: Tensor | None
    colors: Tensor | None
    fps: float
    cameras_known: bool = True  # False for grids whose cameras are placeholders (4Real-Video-V2)
    source_view: int | None = None
    caption: str = ""
    point_times: Tensor | None = None
    point_static: Tensor | None = None


# Checkpoint key of :func:`camera_record`: a stage-3 checkpoint then shows without its data folder.
CAMERAS_KEY = "fourdgen_scene_cameras"


def camera_record(info: SceneInfo) -> dict:
    """The cameras, times and size of ``info`` as plain values (what a checkpoint can hold and
    ``torch.load(weights_only=True)`` reads); ``SceneInfo(points=None, colors=None, **record)``
    rebuilds a SceneInfo without the initial points."""
    return {
        "K": info.K.detach().float().cpu(),
        "w2c": info.w2c.detach().float().cpu(),
        "times": info.times.detach().float().cpu(),
        "height": int(info.height),
        "width": int(info.width),
        "train_views": [int(v) for v in info.train_views],
        "holdout_views": [int(v) for v in info.holdout_views],
        "fps": float(info.fps),
        "cameras_known": bool(info.cameras_known),
        "source_view": info.source_view,
        "caption": info.caption,
    }


@runtime_checkable
class GridBatchSource(Protocol):
    """A DataModule whose training loader yields :class:`~fourdgen.batch.GridBatch`."""

    def train_dataloader(self) -> Iterable: ...


@runtime_checkable
class SceneSource(GridBatchSource, Protocol):
    """One scene for per-scene fitting: frames as ``GridBatch`` plus :class:`SceneInfo` up front."""

    def scene_info(self) -> SceneInfo: ...


@runtime_checkable
class SourceClipSource(SceneSource, Protocol):
    """A scene source that also serves whole views (novel-view regularisers that condition on the
    input video, e.g. flow-matching distillation)."""

    def view_clip(self, view: int) -> dict: ...


def check_datamodule(datamodule: object, protocol: type, stage: str) -> None:
    """Raise :class:`ConfigError` naming each method of ``protocol`` that ``datamodule`` lacks."""
    if datamodule is None:
        raise ConfigError(
            f"{stage} needs a DataModule ({protocol.__name__}: see fourdgen/data/protocols.py); "
            "give one with --data"
        )
    names = {
        n
        for cls in protocol.__mro__
        if getattr(cls, "_is_protocol", False) and cls is not Protocol
        for n, v in vars(cls).items()
        if callable(v) and not n.startswith("_")
    }
    missing = [n for n in sorted(names) if not callable(getattr(datamodule, n, None))]
    if missing:
        raise ConfigError(
            f"data ({type(datamodule).__module__}.{type(datamodule).__qualname__}): {stage} needs a "
            f"DataModule with {', '.join(f'{n}()' for n in missing)} ({protocol.__name__} in "
            "fourdgen/data/protocols.py)"
        )
