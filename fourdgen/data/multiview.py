"""Multi-view video grids with text (and image) embeddings, for stage 1b (grid diffusion).

:class:`MultiViewDataModule` is :class:`~fourdgen.data.datamodules.GridDataModule` whose samples
also carry ``text_embeds`` / ``neg_text_embeds`` (and ``image_embeds`` of the first cell for Wan
I2V checkpoints), embedded by the shared :class:`~fourdgen.data.embeddings.ConditionEmbedder`.
Grids are VAE-encoded by the stage module (no latent cache: the reference cells and clip lengths
change per step).

Training can mix 4Real-Video-V2's four sources (appendix B) and grow the clip length on a step
schedule (:mod:`fourdgen.data.clip_schedule`).
"""

from __future__ import annotations

from typing import Literal

from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader.sampler import RandomSampler

from fourdgen.backbones.image import CLIPImageEncoder, HashImageEncoder
from fourdgen.backbones.text import HashTextEncoder, UMT5TextEncoder
from fourdgen.batch import GridBatch
from fourdgen.data.clip_schedule import ClipLengths, ScheduledBatchSampler, check_schedule
from fourdgen.data.datamodules import GridDataModule, resumable_loader
from fourdgen.data.embeddings import ConditionEmbedder
from fourdgen.data.grid_augment import (
    HomographyGridDataset,
    MixedGridDataset,
    StaticGridDataset,
    check_condition,
)
from fourdgen.data.scene import find_scenes

# Training sources, in the order of ``mix`` (4Real-Video-V2 appendix B: 40 / 20 / 20 / 20 %).
SOURCES = ("multiview", "kubric", "homography", "static")


class EmbeddedGrids(Dataset):
    """Any dataset of one-sample :class:`GridBatch` grids, with the embedder's embeddings added."""

    def __init__(self, base: Dataset, embedder: ConditionEmbedder):
        self.base, self.embedder = base, embedder

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, idx: int) -> GridBatch:
        b = self.base[idx]
        for k, v in self.embedder(b.caption, b.rgb[:, 0, 0], b.scene_id).items():
            setattr(b, k, v)
        return b.validate()


class MultiViewDataModule(GridDataModule):
    """Grids of V views x T frames with embeddings (see :class:`GridDataModule` for the others).

    Args:
        text_encoder / image_encoder / prompt_suffix / negative_prompt: see
            :class:`~fourdgen.data.embeddings.ConditionEmbedder`.
        cache_dir: where text/image embeddings are cached (None: embed at every load).
        condition: given cells (4Real-Video-V2: ``first_view+first_time``; Full-4D: ``first_view``).
        mix: training-sample shares of :data:`SOURCES` (:mod:`fourdgen.data.grid_augment`):
            multi-view grids of the training scenes, multi-view grids of the scenes under
            ``kubric_root`` (4Real-Video-V2's Kubric share), homography grids of monocular clips and
            static (freeze-time) grids, one instant duplicated over time. Validation, test and
            prediction always use plain multi-view grids. Mixed training batches carry no depth
            (homography views have none): for 4Real-Video-V2, which needs none.
        kubric_root: scenes of the second multi-view source (None: the training scenes again).
        monocular_root: scenes whose clips feed the homography grids (None: view 0 of the training
            scenes). homography_strength: see :class:`~fourdgen.data.grid_augment.HomographyGridDataset`.
        static_condition: given cells of static grids ("none", appendix B: freeze-time videos are
            trained without frame conditioning, else the model copies the references).
        clip_schedule: training clip length by step, ``{step: frames}`` (None: ``num_frames``);
            evaluation keeps ``num_frames``. See :mod:`fourdgen.data.clip_schedule`.
    """

    def __init__(
        self,
        root: str = "data/multiview",
        num_views: int | None = 4,
        num_frames: int | None = 9,
        height: int | None = 480,
        width: int | None = 832,
        frame_stride: int = 1,
        condition: str | list[int] = "first_view+first_time",
        text_encoder: HashTextEncoder | UMT5TextEncoder | None = None,
        image_encoder: CLIPImageEncoder | HashImageEncoder | None = None,
        prompt_suffix: str = "",
        negative_prompt: str = "",
        cache_dir: str | None = None,
        mix: tuple[float, float, float, float] = (1.0, 0.0, 0.0, 0.0),
        kubric_root: str | None = None,
        monocular_root: str | None = None,
        homography_strength: float = 0.15,
        static_condition: str | list[int] = "none",
        clip_schedule: dict[int, int] | None = None,
        crop: str = "random",
        load_depth: bool = True,
        samples_per_scene: int = 1,
        on_bad_sample: Literal["skip", "error"] = "skip",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        synthetic=None,
        num_synthetic_scenes: int = 1,
        batch_size: int = 1,
        num_workers: int = 0,
    ):
        super().__init__(
            root=root,
            num_views=num_views,
            num_frames=num_frames,
            height=height,
            width=width,
            frame_stride=frame_stride,
            crop=crop,
            condition=condition,
            load_depth=load_depth,
            load_xyz=False,
            load_mask=False,
            samples_per_scene=samples_per_scene,
            on_bad_sample=on_bad_sample,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            synthetic=synthetic,
            num_synthetic_scenes=num_synthetic_scenes,
            batch_size=batch_size,
            num_workers=num_workers,
        )
        mix = [float(w) for w in mix]
        if len(mix) != len(SOURCES) or min(mix) < 0 or sum(mix) <= 0:
            raise ValueError(f"mix: {len(SOURCES)} non-negative shares of {SOURCES}, some > 0; got {mix}")
        if clip_schedule is not None:
            clip_schedule = check_schedule(clip_schedule)
        self.hparams.update(
            prompt_suffix=prompt_suffix,
            negative_prompt=negative_prompt,
            cache_dir=cache_dir,
            mix=mix,
            kubric_root=kubric_root,
            monocular_root=monocular_root,
            homography_strength=homography_strength,
            static_condition=check_condition(static_condition),
            clip_schedule=clip_schedule,
        )
        self.embedder = ConditionEmbedder(
            text_encoder, image_encoder, prompt_suffix, negative_prompt, cache_dir
        )

    def _dataset(self, split: str, num_frames: int | None = None) -> Dataset:
        """The split's grids with embeddings; training: the mixture, at ``num_frames`` if given."""
        if split != "train":
            return EmbeddedGrids(super()._dataset(split), self.embedder)
        return EmbeddedGrids(self._mixture(num_frames or self.hparams.num_frames), self.embedder)

    def _mixture(self, T: int | None) -> Dataset:
        """Training grids of ``T`` frames drawn from the sources with ``mix`` shares."""
        h = self.hparams
        grids = super()._dataset
        if h.mix == [1.0, 0.0, 0.0, 0.0]:
            return grids("train", num_frames=T)
        if T is None:
            raise ValueError("mix: sources other than multi-view grids need num_frames (one clip length)")
        kw = dict(num_frames=T, load_depth=False)  # homography views have no depth: none loads it

        def scenes(root: str | None, name: str):
            found = find_scenes(root) if root else None
            if root and not found:
                raise FileNotFoundError(f"{name} {root}: no scene.json in it or its sub-folders")
            return found

        def homography() -> HomographyGridDataset:
            clips = scenes(h.monocular_root, "monocular_root")
            mono = grids("train", clips, num_views=1, condition="none", **kw)
            return HomographyGridDataset(mono, h.num_views, h.homography_strength, h.condition)

        def static() -> StaticGridDataset:  # one instant of every view, no given cells of its own
            instants = grids("train", num_frames=1, load_depth=False, condition="none")
            return StaticGridDataset(instants, T, h.static_condition)

        build = {
            "multiview": lambda: grids("train", **kw),
            "kubric": lambda: grids("train", scenes(h.kubric_root, "kubric_root"), **kw),
            "homography": homography,
            "static": static,
        }
        enabled = [(name, w) for name, w in zip(SOURCES, h.mix, strict=True) if w > 0]
        return MixedGridDataset(
            [build[name]() for name, _ in enabled],
            [w for _, w in enabled],
            length=len(self.splits["train"]) * h.samples_per_scene,  # an epoch of the plain grids
            names=[name for name, _ in enabled],
        )

    def train_dataloader(self) -> DataLoader:
        schedule = self.hparams.clip_schedule
        if not schedule:
            return super().train_dataloader()
        lengths = set(schedule.values()) | ({self.hparams.num_frames} if min(schedule) > 0 else set())
        ds = ClipLengths({T: self._dataset("train", T) for T in lengths})
        trainer = self.trainer
        sampler = ScheduledBatchSampler(
            RandomSampler(ds),  # torchdata's: its order is part of the loader's state (exact resume)
            self.batch_size,
            drop_last=False,
            schedule=schedule,
            default=self.hparams.num_frames,
            start_step=lambda: trainer.global_step if trainer is not None else 0,
            accumulate=trainer.accumulate_grad_batches if trainer is not None else 1,
        )
        return resumable_loader(
            ds,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=GridBatch.collate,
            persistent_workers=self.num_workers > 0,
        )
