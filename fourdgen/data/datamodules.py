"""DataModules that serve :class:`~fourdgen.batch.GridBatch` from scene folders.

``BaseDataModule`` is the intermediate base class recipes name (an intermediate class also
side-steps Lightning#20024 in LightningCLI's subclass mode); any ``LightningDataModule`` a
user writes works too, as long as it yields ``GridBatch``.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fourdgen.batch import GridBatch
from fourdgen.data.scene import Scene, SceneFormatError, find_scenes, read_scene
from fourdgen.data.synthetic import SyntheticConfig, ensure_scene
from fourdgen.geometry.cameras import crop_intrinsics, scale_intrinsics

CONDITIONS = ("none", "first_frame", "first_view", "first_time")


def resize_crop_plan(
    src_hw: tuple[int, int], dst_hw: tuple[int, int] | None, crop: str, rng: random.Random
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Resize so the image covers ``dst_hw`` (aspect kept), then crop. Returns the resized size
    (h, w) and the crop's (top, left)."""
    H0, W0 = src_hw
    if dst_hw is None:
        return (H0, W0), (0, 0)
    H, W = dst_hw
    s = max(H / H0, W / W0)
    h, w = max(H, round(H0 * s)), max(W, round(W0 * s))
    if crop == "center":
        return (h, w), ((h - H) // 2, (w - W) // 2)
    if crop == "random":
        return (h, w), (rng.randint(0, h - H), rng.randint(0, w - W))
    raise ValueError(f"crop: expected 'center' or 'random', got {crop!r}")


def adjust_intrinsics(
    K: Tensor, src_hw: tuple[int, int], resized_hw: tuple[int, int], top_left: tuple[int, int]
) -> Tensor:
    """``K`` after resizing ``src_hw -> resized_hw`` and cropping at ``top_left``."""
    K = scale_intrinsics(K, resized_hw[1] / src_hw[1], resized_hw[0] / src_hw[0])
    return crop_intrinsics(K, top_left[1], top_left[0])


def _resize(
    x: Tensor, size: tuple[int, int], top_left: tuple[int, int], out_hw: tuple[int, int], mode: str
) -> Tensor:
    """Resize ``x [N, C, H, W]`` then crop. ``mode="nearest-exact"`` (pixel-centre aligned, unlike
    "nearest") for depth/xyz/masks (values must not
    blend across object edges)."""
    if tuple(x.shape[-2:]) != size:
        kw = {"antialias": True, "align_corners": False} if mode == "bilinear" else {}
        x = F.interpolate(x.float() if mode == "bilinear" else x, size=size, mode=mode, **kw)
    t, l = top_left
    return x[..., t : t + out_hw[0], l : l + out_hw[1]]


class GridDataset(Dataset):
    """Samples of V views x T frames from a list of scenes.

    Args:
        scenes: scene folders.
        num_views / num_frames: grid size per sample (None = all the scene has).
        height / width: output resolution (None = native); resize-to-cover then crop.
        frame_stride: step between sampled frames.
        random_sampling: random views, start frame and crop (training) vs. first ones (eval).
        condition: which cells are marked ``observed``: none/first_frame/first_view/first_time,
            several joined by ``+`` (4Real-Video-V2's references: ``first_view+first_time``, the
            fixed-view row and the freeze-time column), or a list of frame indices (of the first
            view: sparse given frames).
        samples_per_scene: dataset length multiplier (random sampling gives different grids).
        on_bad_sample: a scene that does not read (a SceneFormatError: malformed scene.json, a
            truncated frame, a bad array): ``skip`` it with a warning naming the file and field,
            counted in :attr:`skipped` (a large dataset keeps training), or ``error`` (stop there).
    """

    def __init__(
        self,
        scenes: list[Path],
        num_views: int | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        frame_stride: int = 1,
        random_sampling: bool = False,
        crop: str = "center",
        condition: str | list[int] = "first_frame",
        load_depth: bool = True,
        load_xyz: bool = True,
        load_mask: bool = True,
        samples_per_scene: int = 1,
        on_bad_sample: str = "skip",
    ):
        if on_bad_sample not in ("skip", "error"):
            raise ValueError(f"on_bad_sample: expected 'skip' or 'error', got {on_bad_sample!r}")
        if isinstance(condition, str) and any(c not in CONDITIONS for c in condition.split("+")):
            raise ValueError(
                f"condition: expected one of {CONDITIONS} (or several joined by '+', e.g. "
                f"'first_view+first_time') or frame indices, got {condition!r}"
            )
        self.on_bad_sample, self.skipped = on_bad_sample, 0
        self.scenes: list[Scene] = [s for s in (self._read(p) for p in scenes) if s is not None]
        if not self.scenes:
            raise SceneFormatError(
                scenes[0] if scenes else "<no scenes>",
                "<scene>",
                "at least one readable scene",
                f"{self.skipped} of {len(scenes)} skipped",
            )
        self.num_views, self.num_frames, self.frame_stride = num_views, num_frames, frame_stride
        self.out_hw = (height, width) if height and width else None
        self.random_sampling, self.crop, self.condition = random_sampling, crop, condition
        self.load = {"depth": load_depth, "xyz": load_xyz, "mask": load_mask}
        self.samples_per_scene = samples_per_scene
        for s in self.scenes:
            V = num_views or s.num_views
            T = ((num_frames or s.num_frames) - 1) * frame_stride + 1
            if s.num_views < V or s.num_frames < T:
                raise ValueError(
                    f"{s.root}: needs at least {V} views x {T} frames (num_views, num_frames,"
                    f" frame_stride), scene has {s.num_views} x {s.num_frames}"
                )

    def _skip(self, e: SceneFormatError) -> None:
        if self.on_bad_sample == "error":
            raise e
        self.skipped += 1
        warnings.warn(f"skipping a bad sample ({self.skipped} so far in this process): {e}", stacklevel=3)

    def _read(self, path: Path) -> Scene | None:
        try:
            return read_scene(path)
        except SceneFormatError as e:
            self._skip(e)
            return None

    def __len__(self) -> int:
        return len(self.scenes) * self.samples_per_scene

    def __getitem__(self, idx: int) -> GridBatch:
        """The sample at ``idx``; one whose files fail to load is skipped for the next scene's
        (``on_bad_sample: skip``), so a worker never dies on a bad file."""
        for attempt in range(len(self.scenes)):
            try:
                return self._sample(idx + attempt)  # scene (idx + attempt) % n: the next one
            except SceneFormatError as e:
                self._skip(e)
        raise SceneFormatError(
            self.scenes[0].root / "scene.json",
            "<scene>",
            "a readable sample",
            f"every scene failed to load ({self.skipped} skipped)",
        )

    def _sample(self, idx: int) -> GridBatch:
        scene = self.scenes[idx % len(self.scenes)]
        # torch's RNG is seeded per DataLoader worker (and by Lightning's seed_everything); a Python
        # RNG copied into workers would repeat the same samples in each of them.
        rng = random.Random(int(torch.randint(2**62, ())) if self.random_sampling else idx)
        V = self.num_views or scene.num_views
        T = self.num_frames or scene.num_frames
        span = (T - 1) * self.frame_stride + 1
        if self.random_sampling:
            views = sorted(rng.sample(range(scene.num_views), V))
            start = rng.randint(0, scene.num_frames - span)
        else:
            views, start = list(range(V)), 0
        times = list(range(start, start + span, self.frame_stride))
        H0, W0 = scene.height, scene.width
        size, top_left = resize_crop_plan(
            (H0, W0), self.out_hw, self.crop if self.random_sampling else "center", rng
        )
        out_hw = self.out_hw or (H0, W0)

        def grid(load, mode: str) -> Tensor:  # [V, T, C, H, W]
            per_view = []
            for v in views:
                x = load(v, times)
                x = x[:, None] if x.ndim == 3 else (x.permute(0, 3, 1, 2) if x.shape[-1] == 3 else x)
                per_view.append(_resize(x, size, top_left, out_hw, mode))
            return torch.stack(per_view)

        rgb = grid(scene.load_rgb, "bilinear") * 2 - 1
        K = torch.stack([adjust_intrinsics(scene.K[v], (H0, W0), size, top_left) for v in views])
        w2c = scene.w2c[views][:, times]
        extra = {}
        for key, has in (("depth", scene.has_depth), ("xyz", scene.has_xyz), ("mask", scene.has_mask)):
            if self.load[key] and has:
                extra[key] = grid(getattr(scene, f"load_{key}"), "nearest-exact")
        observed = torch.zeros(V, T, dtype=torch.bool)
        if isinstance(self.condition, str):
            parts = self.condition.split("+")
            observed[0, 0] = "first_frame" in parts
            if "first_view" in parts:
                observed[0] = True
            if "first_time" in parts:
                observed[:, 0] = True
        else:
            bad = [t for t in self.condition if not 0 <= t < T]
            if bad:
                raise ValueError(f"condition: frames {bad} outside the clip's {T} frames")
            observed[0, self.condition] = True
        t_norm = torch.tensor(times, dtype=torch.float32) / max(scene.num_frames - 1, 1)
        return GridBatch(
            rgb=rgb[None].clamp(-1, 1),
            K=K[None],
            w2c=w2c[None],
            observed=observed[None],
            times=t_norm[None],
            view_ids=torch.tensor(views)[None],
            time_ids=torch.tensor(times)[None],
            caption=[scene.caption],
            scene_id=[scene.root.name],
            **{k: v[None] for k, v in extra.items()},
        )


def resumable_loader(ds: Dataset, **kw) -> DataLoader:
    """A ``DataLoader`` (torchdata's ``StatefulDataLoader``) whose position in the epoch, shuffled
    order included, goes into Lightning's checkpoints: a run killed mid-epoch resumes with the very
    batches it would have seen (a plain DataLoader restarts the epoch in a new order)."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated since torch 2.8
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StatefulDataLoader(ds, **kw)


class BaseDataModule(L.LightningDataModule):
    """Base of fourdgen's DataModules: loaders that collate :class:`GridBatch`."""

    def __init__(self, batch_size: int = 1, num_workers: int = 0):
        super().__init__()
        self.batch_size, self.num_workers = batch_size, num_workers

    def _plain_synthetic(self, synthetic: SyntheticConfig | dict | None) -> None:
        """Store ``hparams.synthetic`` as a plain dict: checkpoints load with ``weights_only=True``."""
        if synthetic is not None:
            self.hparams["synthetic"] = (
                asdict(synthetic) if isinstance(synthetic, SyntheticConfig) else dict(synthetic)
            )

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        return resumable_loader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=GridBatch.collate,
            persistent_workers=self.num_workers > 0,
        )


class GridDataModule(BaseDataModule):
    """Grids of V views x T frames from a folder of scenes, split train/val/test by scene.

    Args:
        root: a folder of scene folders, or one scene folder.
        synthetic: if given, ``prepare_data`` writes ``num_synthetic_scenes`` synthetic scenes
            (seeds ``synthetic.seed + i``) under ``root`` unless identical ones exist.
        val_fraction / test_fraction: share of scenes held out (at least one each when there are
            three or more scenes; with fewer, every split uses all scenes and a warning says so).
        Other arguments: see :class:`GridDataset`.
    """

    def __init__(
        self,
        root: str = "data/scenes",
        num_views: int | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        frame_stride: int = 1,
        crop: str = "random",
        condition: str | list[int] = "first_frame",
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
        # This class's own arguments, explicitly: save_hyperparameters() would collect the outermost
        # __init__'s (a subclass's), which differ between direct and CLI construction.
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters(args)
        self._plain_synthetic(synthetic)
        self.root = Path(root)
        self.splits: dict[str, list[Path]] = {}

    def prepare_data(self) -> None:
        cfg = self.hparams.synthetic
        if cfg is None:
            return
        cfg = SyntheticConfig(**cfg)
        for i in range(self.hparams.num_synthetic_scenes):
            ensure_scene(
                self.root / f"synth_{i:03d}", SyntheticConfig(**{**asdict(cfg), "seed": cfg.seed + i})
            )

    def split_scenes(self) -> dict[str, list[Path]]:
        scenes = find_scenes(self.root)
        if not scenes:
            raise FileNotFoundError(
                f"{self.root}: no scene.json in this folder or its sub-folders "
                "(data.root; see fourdgen/data/scene.py for the format)"
            )
        if len(scenes) < 3:
            warnings.warn(
                f"{self.root}: only {len(scenes)} scene(s); train/val/test all use them", stacklevel=2
            )
            return {"train": scenes, "val": scenes, "test": scenes}
        order = scenes[:]
        random.Random(self.hparams.seed).shuffle(order)
        n_val = max(1, round(len(order) * self.hparams.val_fraction))
        n_test = max(1, round(len(order) * self.hparams.test_fraction))
        return {"val": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}

    def setup(self, stage: str | None = None) -> None:
        self.splits = self.split_scenes()

    def _dataset(self, split: str, scenes: list[Path] | None = None, **overrides) -> GridDataset:
        """The split's :class:`GridDataset` (``overrides``: its arguments, e.g. ``num_views=1``)."""
        h = self.hparams
        train = split == "train"
        kw = dict(
            num_views=h.num_views,
            num_frames=h.num_frames,
            height=h.height,
            width=h.width,
            frame_stride=h.frame_stride,
            random_sampling=train,
            crop=h.crop,
            condition=h.condition,
            load_depth=h.load_depth,
            load_xyz=h.load_xyz,
            load_mask=h.load_mask,
            samples_per_scene=h.samples_per_scene if train else 1,
            on_bad_sample=h.get("on_bad_sample", "skip"),
        )
        return GridDataset(self.splits[split] if scenes is None else scenes, **{**kw, **overrides})

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("train"), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("val"), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test"), shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("test"), shuffle=False)
