"""One scene served as single frames: the DataModule of per-scene optimisation (stage 3).

Training samples are (view, time) frames of the training views; validation and test render
the held-out views at every time. :meth:`SceneFramesDataModule.scene_info` gives the fitter
what it needs before training: cameras, timestamps and an initial point cloud
(:class:`~fourdgen.data.protocols.SceneSource`, the protocol of stage 3).
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fourdgen.batch import GridBatch
from fourdgen.data.datamodules import (
    BaseDataModule,
    _resize,
    adjust_intrinsics,
    resize_crop_plan,
    resumable_loader,
)
from fourdgen.data.protocols import SceneInfo
from fourdgen.data.scene import Scene, read_scene
from fourdgen.data.synthetic import SyntheticConfig, ensure_scene
from fourdgen.geometry.projection import depth_to_points, pointmap_to_depth

INIT_FRAMES = ("first", "all")


class _Frames(Dataset):
    """All frames of some views, held in memory as uint8 (``[V, T, 3, H, W]``), on the CPU or on the
    training device. A batch is gathered in one indexing per field (``__getitems__``), so with the
    frames on the GPU a step's batch costs a few kernels and no host-to-device copy of images."""

    def __init__(
        self,
        rgb: Tensor,
        K: Tensor,
        w2c: Tensor,
        times: Tensor,
        views: list[int],
        mask: Tensor | None,
        repeat: int = 1,
        depth: Tensor | None = None,
        device: torch.device | str = "cpu",
    ):
        on = lambda x: None if x is None else x.to(device)  # noqa: E731
        self.rgb, self.K, self.w2c, self.times = on(rgb), on(K), on(w2c), on(times)
        self.mask = on(mask)
        self.depth = on(depth)  # [V, T, H, W] float16 z-depth (0 = unknown), or None
        self.views = views
        self.view_ids = on(torch.tensor(views))
        self.T, self.repeat = rgb.shape[1], repeat

    def __len__(self) -> int:
        return len(self.views) * self.T * self.repeat

    def __getitem__(self, idx: int) -> GridBatch:
        return self.__getitems__([idx])

    def __getitems__(self, indices: list[int]) -> GridBatch:
        """The frames ``indices`` as one batch of B single-frame grids."""
        idx = torch.as_tensor(indices) % (len(self.views) * self.T)
        vi, t = (torch.stack([idx // self.T, idx % self.T]).to(self.rgb.device, non_blocking=True)).unbind()
        v = self.view_ids[vi]
        B, dev = len(indices), self.rgb.device
        return GridBatch(
            rgb=(self.rgb[vi, t].float() / 127.5 - 1)[:, None, None],
            K=self.K[v][:, None],
            w2c=self.w2c[v, t][:, None, None],
            observed=torch.ones(B, 1, 1, dtype=torch.bool, device=dev),
            times=self.times[t][:, None],
            view_ids=v[:, None],
            time_ids=t[:, None],
            mask=None if self.mask is None else self.mask[vi, t][:, None, None],
            depth=None if self.depth is None else self.depth[vi, t].float()[:, None, None, None],
        )


def _collate(samples: GridBatch | list[GridBatch]) -> GridBatch:
    """A batch :meth:`_Frames.__getitems__` gathered as is; single frames (a user's sampler that
    yields indices one by one) concatenated."""
    return samples if isinstance(samples, GridBatch) else GridBatch.collate(samples)


class SceneFramesDataModule(BaseDataModule):
    """Frames of one scene for per-scene 4D Gaussian fitting.

    Args:
        scene: scene folder.
        synthetic: if given, ``prepare_data`` writes this synthetic scene at ``scene`` (unless an
            identical one is there): the quickstart's built-in default.
        holdout_views: views never trained on; validation and test render them.
        height / width: optional resolution (resize-to-cover + centre crop, K adjusted).
        init_points: size of the initial point cloud taken from the training views' xyz/depth.
        init_frames: timesteps the initial point cloud comes from: "first" (as 4DGaussians does for
            multi-view video) or "all" (moving objects then start with a copy at every position,
            but later frames add what frame 0 hides: on the quickstart "all" is 2 dB better).
        split_static: classify the initial points as static or moving (free-space carving and
            photo-consistency over the clip, :func:`~fourdgen.geometry.visibility.static_points`):
            the background is drawn once instead of once per frame, the moving objects at every
            frame, and the fitter learns which Gaussians it need not deform (``SceneInfo.point_static``).
            Needs depth or xyz for the training views.
        repeat: passes over the training frames per epoch.
        depth_model: a local depth-estimation checkpoint (Depth Anything V2 through transformers,
            :class:`~fourdgen.backbones.depth.DepthEstimator`) that estimates the depth of training
            views without depth or xyz files (a generated grid has depth for its source view only);
            each is aligned to the source view's depth projected into it
            (:func:`~fourdgen.geometry.depth_fusion.align_views_to_source`) before the fused cloud
            initialises the Gaussians. Without it such views add no initial points.
        depth_device: where ``depth_model`` runs ("auto": CUDA if there is one).
        train_depth: serve the training views' depth in their batches (``GridBatch.depth``; 0 where
            unknown): the depth files, else the xyz files' z, else ``depth_model``'s aligned estimate.
            The fitter's ``depth_weight`` supervises its rendered depth with it.
        frames_on_device: keep the frames (uint8) on the training device and gather each batch there:
            no per-step image conversion and copy on the host, whose time the launch-bound 4DGS
            step waits for (issue 21). None (default): when the device is CUDA and the frames take
            at most a quarter of its memory (Full-4D's 6 x 81 at 384x672: 380 MB). The loaders then
            run in the main process (``num_workers`` is ignored: there is nothing left to load).
    """

    def __init__(
        self,
        scene: str = "data/quickstart/scene",
        synthetic: SyntheticConfig | None = None,
        holdout_views: list[int] | None = None,
        height: int | None = None,
        width: int | None = None,
        init_points: int = 20_000,
        init_frames: str = "first",
        split_static: bool = False,
        repeat: int = 1,
        depth_model: str | None = None,
        depth_device: str = "auto",
        train_depth: bool = False,
        frames_on_device: bool | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
    ):
        # This class's own arguments, explicitly: save_hyperparameters() alone collects the outermost
        # __init__'s, which is a user's DataModule when one wraps this one.
        args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__(batch_size=batch_size, num_workers=num_workers)
        self.save_hyperparameters(args)
        self._plain_synthetic(synthetic)
        self.root = Path(scene)
        self._loaded: dict | None = None

    def prepare_data(self) -> None:
        cfg = self.hparams.synthetic
        if cfg is not None:
            ensure_scene(self.root, SyntheticConfig(**cfg))

    def setup(self, stage: str | None = None) -> None:
        if self._loaded is not None:
            return
        scene: Scene = read_scene(self.root)
        h = self.hparams
        holdout = list(h.holdout_views or [])
        bad = [v for v in holdout if not 0 <= v < scene.num_views]
        if bad or len(holdout) >= scene.num_views:
            raise ValueError(
                f"data.holdout_views: expected distinct view indices in [0, {scene.num_views}) "
                f"leaving at least one training view, got {holdout}"
            )
        H0, W0 = scene.height, scene.width
        size, top_left = resize_crop_plan(
            (H0, W0), (h.height, h.width) if h.height and h.width else None, "center", None
        )
        out_hw = (h.height, h.width) if h.height and h.width else (H0, W0)

        def load(v: int, fn, mode: str) -> Tensor | None:
            x = fn(v)
            if x is None:
                return None
            x = x[:, None] if x.ndim == 3 else (x.permute(0, 3, 1, 2) if x.shape[-1] == 3 else x)
            return _resize(x, size, top_left, out_hw, mode)

        V = scene.num_views
        rgb = torch.stack(
            [(load(v, scene.load_rgb, "bilinear") * 255).round().clamp(0, 255).byte() for v in range(V)]
        )
        masks = [load(v, scene.load_mask, "nearest-exact") for v in range(V)]
        self._loaded = {
            "rgb": rgb,  # [V, T, 3, H, W] uint8
            "mask": torch.stack(masks) if all(m is not None for m in masks) else None,
            "K": torch.stack([adjust_intrinsics(scene.K[v], (H0, W0), size, top_left) for v in range(V)]),
            "w2c": scene.w2c,
            "times": torch.linspace(0, 1, scene.num_frames) if scene.num_frames > 1 else torch.zeros(1),
            "train": [v for v in range(V) if v not in holdout],
            "holdout": holdout or list(range(V)),
            "scene": scene,
            "out_hw": out_hw,
            "plan": (size, top_left),
        }
        if h.train_depth:
            self._loaded["train_depth"] = self._train_depths()

    def _train_depths(self) -> Tensor:
        """``[V_train, T, H, W]`` float16 z-depth of the training views at the served size (0 =
        unknown): the depth files, else the xyz files' z, else ``depth_model``'s aligned estimate."""
        d = self._loaded
        scene: Scene = d["scene"]
        estimated = self._estimated_depth(scene, d["train"], None)
        size, top_left = d["plan"]
        out = []
        for v in d["train"]:
            if scene.views[v].depth is not None:
                z = scene.load_depth(v)
            elif scene.views[v].xyz is not None:
                z = pointmap_to_depth(scene.load_xyz(v), scene.w2c[v])
            else:
                z = estimated.get(v, torch.zeros(scene.num_frames, scene.height, scene.width))
            z = torch.nan_to_num(z.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
            out.append(_resize(z[:, None], size, top_left, d["out_hw"], "nearest-exact")[:, 0].half())
        return torch.stack(out)

    def scene_info(self) -> SceneInfo:
        """Cameras, times and an initial point cloud (from the training views' xyz or depth)."""
        self.setup()
        d = self._loaded
        scene: Scene = d["scene"]
        mode = self.hparams.init_frames
        if mode not in INIT_FRAMES:
            raise ValueError(f"data.init_frames: expected one of {INIT_FRAMES}, got {mode!r}")
        if self.hparams.split_static and mode != "all":
            raise ValueError("data.split_static: needs init_frames: all (motion shows only across frames)")
        times = [0] if mode == "first" else None
        pts, cols, when, depths = [], [], [], []
        estimated = self._estimated_depth(scene, d["train"], times)
        for v in d["train"]:
            xyz = scene.load_xyz(v, times)
            depth = scene.load_depth(v, times) if scene.views[v].depth is not None else estimated.get(v)
            w2c = scene.w2c[v] if times is None else scene.w2c[v, times]
            if xyz is None and depth is not None:
                xyz = depth_to_points(depth, scene.K[v], w2c)
            if xyz is None:
                continue
            valid = torch.isfinite(xyz).all(-1)
            if depth is not None:
                valid &= depth > 0
            rgb = scene.load_rgb(v, times).permute(0, 2, 3, 1)
            pts.append(xyz[valid])
            cols.append(rgb[valid])
            when.append(torch.arange(xyz.shape[0])[:, None, None].expand(valid.shape)[valid])
            if self.hparams.split_static:
                z = pointmap_to_depth(xyz, w2c) if depth is None else depth
                depths.append((v, torch.where(valid, z, torch.zeros_like(z)), rgb))
        points = colors = point_times = point_static = None
        if pts:
            points, colors, frame = torch.cat(pts), torch.cat(cols), torch.cat(when)
            g = torch.Generator().manual_seed(self.hparams.seed)
            n = self.hparams.init_points
            if depths:
                points, colors, frame, point_static = self._split_static(
                    scene, depths, points, colors, frame, n, g
                )
            else:
                keep = torch.randperm(len(points), generator=g)[:n]
                points, colors, frame = points[keep], colors[keep], frame[keep]
            if mode == "all":
                point_times = d["times"][frame]
        H, W = d["out_hw"]
        return SceneInfo(
            K=d["K"],
            w2c=d["w2c"],
            times=d["times"],
            height=H,
            width=W,
            train_views=d["train"],
            holdout_views=d["holdout"],
            points=points,
            colors=colors,
            point_times=point_times,
            point_static=point_static,
            fps=scene.fps,
            cameras_known=scene.extra.get("cameras") != "unknown",
            source_view=scene.source_view,
            caption=scene.caption,
        )

    @staticmethod
    def _split_static(scene: Scene, depths, points, colors, frame, n: int, g: torch.Generator):
        """Classify candidate points static or moving (:func:`~fourdgen.geometry.visibility.static_points`
        on the training views' depth and colour) and draw ``n`` of them. A static surface appears
        in every frame and a moving one in one, so static candidates count 1/T each: the cloud then
        holds the background once and the moving objects at every time."""
        from fourdgen.geometry.visibility import static_points

        pool = torch.randperm(len(points), generator=g)[: 8 * n]  # bounds the classification's cost
        points, colors, frame = points[pool], colors[pool], frame[pool]
        views = [v for v, _, _ in depths]
        static = static_points(
            points,
            scene.K[views],
            scene.w2c[views],
            torch.stack([z for _, z, _ in depths]),
            torch.stack([c for _, _, c in depths]),
        )
        weight = torch.where(static, 1.0 / scene.num_frames, 1.0)
        keep = torch.multinomial(weight, min(n, len(weight)), replacement=False, generator=g)
        n_static = int(static[keep].sum())
        rank_zero_info(
            f"fourdgen: initial points: {n_static} static, {len(keep) - n_static} moving "
            f"({int((~static).sum())} of {len(static)} candidates move)"
        )
        return points[keep], colors[keep], frame[keep], static[keep]

    def _estimated_depth(self, scene: Scene, views: list[int], times: list[int] | None) -> dict[int, Tensor]:
        """Depth of the ``views`` that have no depth/xyz files, estimated and aligned to the source
        view's (needs ``depth_model`` and a ``source_view`` with depth); ``{view: [T', H, W]}``."""
        cache = self._loaded.setdefault("estimated_depth", {}) if self._loaded is not None else {}
        key = (tuple(views), None if times is None else tuple(times))
        if key not in cache:  # the training depth and the initial points share one estimate
            cache[key] = self._estimate_depth(scene, views, times)
        return cache[key]

    def _estimate_depth(self, scene: Scene, views: list[int], times: list[int] | None) -> dict[int, Tensor]:
        missing = [v for v in views if scene.views[v].depth is None and scene.views[v].xyz is None]
        path, s = self.hparams.depth_model, scene.source_view
        if not missing or path is None:
            return {}
        if s is None or scene.views[s].depth is None:
            raise ValueError(
                f"data.depth_model: {scene.root} states no source view with depth (scene.json "
                "'source_view' and its depth file) to align the estimated views to"
            )
        from fourdgen.backbones.depth import DepthEstimator
        from fourdgen.geometry.depth_fusion import align_views_to_source

        est = DepthEstimator(path, device=self.hparams.depth_device)
        views = [s, *missing]
        t = slice(None) if times is None else times
        pred = torch.stack([est(scene.load_rgb(v, times)).cpu() for v in views])
        depth, report = align_views_to_source(
            pred, est.space, scene.K[views], scene.w2c[views][:, t], 0, scene.load_depth(s, times)
        )
        for r in report[1:]:
            rank_zero_info(
                f"fourdgen: view {views[r['view']]} depth aligned to the source view's on {r['pixels']} "
                f"pixels (relative error {r['rel_residual']:.3f})"
            )
        return {v: depth[i] for i, v in enumerate(views) if i > 0}

    def view_clip(self, view: int) -> dict:
        """One whole view at the served resolution: ``rgb [T, 3, H, W]`` in [0, 1] and ``depth
        [T, H, W]`` (0 = unknown; None when the view has no depth file)."""
        self.setup()
        d = self._loaded
        scene: Scene = d["scene"]
        if not 0 <= view < scene.num_views:
            raise ValueError(f"{scene.root}: view {view} does not exist (the scene has {scene.num_views})")
        depth = scene.load_depth(view) if scene.views[view].depth is not None else None
        if depth is not None:
            size, top_left = d["plan"]
            depth = _resize(depth[:, None], size, top_left, d["out_hw"], "nearest-exact")[:, 0]
        return {"rgb": d["rgb"][view].float() / 255, "depth": depth}

    def _frames(self, views: list[int], repeat: int = 1, depth: Tensor | None = None) -> _Frames:
        d = self._loaded
        idx = torch.tensor(views)
        rgb = d["rgb"][idx]
        mask = None if d["mask"] is None else d["mask"][idx]
        return _Frames(
            rgb, d["K"], d["w2c"], d["times"], views, mask, repeat=repeat, depth=depth,
            device=self._frames_device(rgb, mask, depth),
        )  # fmt: skip

    def _frames_device(self, *tensors: Tensor | None) -> torch.device:
        """Where the frames live: the trainer's device if ``frames_on_device`` says so (None: CUDA
        with the frames at most a quarter of its memory), else the CPU."""
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        want = self.hparams.get("frames_on_device")
        if want is None:
            size = sum(t.numel() * t.element_size() for t in tensors if t is not None)
            want = device.type == "cuda" and size <= torch.cuda.get_device_properties(device).total_memory / 4
        return device if want else torch.device("cpu")

    def _frames_loader(self, ds: _Frames, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        workers = 0 if ds.rgb.device.type != "cpu" else self.num_workers  # no CUDA tensors in workers
        return resumable_loader(
            ds,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            collate_fn=_collate,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        d = self._loaded
        ds = self._frames(d["train"], self.hparams.repeat, d.get("train_depth"))
        return self._frames_loader(ds, shuffle=True)

    def _eval_loader(self) -> DataLoader:
        ds = self._frames(self._loaded["holdout"])
        return DataLoader(ds, batch_size=len(ds.times), shuffle=False, collate_fn=_collate)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader()
