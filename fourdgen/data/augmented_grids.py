"""4Real-Video-V2's training mixture as a DataModule: multi-view grids, homography grids of
monocular clips and static grids (the datasets of :mod:`fourdgen.data.grid_augment`) drawn with
given weights from folders of scenes. It yields plain grids (no text embeddings), e.g. for the
feed-forward reconstructor; :class:`~fourdgen.data.multiview.MultiViewDataModule` adds them for
the diffusion stage."""

from __future__ import annotations

import dataclasses
from typing import Literal

from torch.utils.data import DataLoader

from fourdgen.data.datamodules import GridDataModule
from fourdgen.data.grid_augment import (
    HomographyGridDataset,
    MixedGridDataset,
    StaticGridDataset,
    random_homographies,
)
from fourdgen.data.scene import Scene, find_scenes
from fourdgen.data.synthetic import SyntheticConfig


def single_view_scene(scene: Scene, view: int) -> Scene:
    """``scene`` restricted to one view (a monocular clip of it)."""
    if not 0 <= view < scene.num_views:
        raise ValueError(f"{scene.root}: view {view} requested, scene has {scene.num_views} views")
    return dataclasses.replace(
        scene, K=scene.K[view : view + 1], w2c=scene.w2c[view : view + 1], views=[scene.views[view]]
    )


def first_frame_scene(scene: Scene) -> Scene:
    """``scene`` restricted to its first frame (one instant)."""
    return dataclasses.replace(scene, num_frames=1, w2c=scene.w2c[:, :1])


class AugmentedGridDataModule(GridDataModule):
    """4Real-Video-V2's training mixture over a folder of multi-view scenes.

    Training samples are drawn with ``weights`` from (see :mod:`fourdgen.data.grid_augment`):

    0. multi-view grids of the training scenes (:class:`GridDataset`, random views/start/crop);
    1. homography grids (:class:`HomographyGridDataset`) of monocular clips: view
       ``monocular_view`` of each training scene, or of each scene under ``monocular_root``
       (``monocular_view=None``: a random view per sample);
    2. static grids (:class:`StaticGridDataset`): the training scenes (or every scene under
       ``static_root``, e.g. a static multi-view dataset) at their first instant
       (``static_random_time``: a random instant), duplicated over ``num_frames``.

    A weight of 0 disables a source (its scenes are not even read). Validation, test and predict
    use plain multi-view grids (:class:`GridDataModule`, which also does the splits and writes
    ``synthetic`` scenes in ``prepare_data``). All sources load the same optional fields
    (``load_depth`` ...): scenes under ``monocular_root`` must have them too.

    Args:
        weights: shares of (multi-view, homography, static) training samples.
        homography_strength / homography_sweep: see :func:`random_homographies`.
        train_length: training samples per epoch (None: training scenes x ``samples_per_scene``).
        Other arguments: see :class:`GridDataModule` and :class:`GridDataset`; ``condition`` marks
        the observed cells of every source's grids.
    """

    def __init__(
        self,
        root: str = "data/scenes",
        num_views: int = 4,
        num_frames: int = 8,
        height: int | None = None,
        width: int | None = None,
        frame_stride: int = 1,
        crop: str = "random",
        condition: str | list[int] = "first_view+first_time",
        weights: tuple[float, float, float] = (0.4, 0.4, 0.2),
        monocular_root: str | None = None,
        monocular_view: int | None = 0,
        static_root: str | None = None,
        homography_strength: float = 0.15,
        homography_sweep: bool = True,
        static_random_time: bool = False,
        train_length: int | None = None,
        load_depth: bool = True,
        load_xyz: bool = True,
        load_mask: bool = True,
        samples_per_scene: int = 1,
        on_bad_sample: Literal["skip", "error"] = "skip",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        synthetic: SyntheticConfig | None = None,
        num_synthetic_scenes: int = 1,
        batch_size: int = 1,
        num_workers: int = 0,
    ):
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        own = ("weights", "monocular_root", "monocular_view", "static_root", "homography_strength")
        own += ("homography_sweep",)
        own += ("static_random_time", "train_length")
        super().__init__(**{k: v for k, v in args.items() if k not in own})
        weights = [float(w) for w in weights]
        if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(
                f"weights: 3 non-negative shares of (multi-view, homography, static) grids, some > 0; "
                f"got {weights}"
            )
        random_homographies(1, 1, 1, homography_strength)  # validates the strength now
        # Replaces the GridDataModule's hparams by this class's own arguments (a superset).
        self.save_hyperparameters({**args, "weights": weights})
        self._plain_synthetic(synthetic)

    def train_dataset(self) -> MixedGridDataset:
        """The training mixture (after ``setup``)."""
        h = self.hparams
        grids = self._dataset("train")
        build = {
            "multiview": lambda: grids,
            "homography": self._homography_source,
            "static": self._static_source,
        }
        enabled = [(name, w) for name, w in zip(build, h.weights, strict=True) if w > 0]
        return MixedGridDataset(
            [build[name]() for name, _ in enabled],
            [w for _, w in enabled],
            length=h.train_length or len(grids),
            names=[name for name, _ in enabled],
        )

    def _homography_source(self) -> HomographyGridDataset:
        h = self.hparams
        scenes = find_scenes(h.monocular_root) if h.monocular_root else self.splits["train"]
        if not scenes:
            raise FileNotFoundError(
                f"monocular_root {h.monocular_root}: no scene.json in it or its sub-folders"
            )
        mono = self._dataset("train", scenes, num_views=1, condition="none")
        if h.monocular_view is not None:  # only that view can be sampled
            mono.scenes = [single_view_scene(s, h.monocular_view) for s in mono.scenes]
        return HomographyGridDataset(
            mono, h.num_views, h.homography_strength, h.condition, sweep=h.homography_sweep
        )

    def _static_source(self) -> StaticGridDataset:
        h = self.hparams
        scenes = find_scenes(h.static_root) if h.static_root else None
        if h.static_root and not scenes:
            raise FileNotFoundError(f"static_root {h.static_root}: no scene.json in it or its sub-folders")
        instants = self._dataset("train", scenes, num_frames=1, condition="none")
        if not h.static_random_time:  # the scenes' first frame only
            instants.scenes = [first_frame_scene(s) for s in instants.scenes]
        return StaticGridDataset(instants, h.num_frames, h.condition)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset(), shuffle=True)
