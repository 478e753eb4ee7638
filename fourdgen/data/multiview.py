"""Multi-view video grids with text (and image) embeddings, for stage 1b (grid diffusion).

:class:`MultiViewDataModule` is :class:`~fourdgen.data.datamodules.GridDataModule` whose samples
also carry ``text_embeds`` / ``neg_text_embeds`` (and ``image_embeds`` of the first cell for Wan
I2V checkpoints), embedded by the shared :class:`~fourdgen.data.embeddings.ConditionEmbedder`.
Grids are VAE-encoded by the stage module (no latent cache: the reference cells and clip lengths
change per step).
"""

from __future__ import annotations

from torch.utils.data import Dataset

from fourdgen.backbones.image import CLIPImageEncoder, HashImageEncoder
from fourdgen.backbones.text import HashTextEncoder, UMT5TextEncoder
from fourdgen.batch import GridBatch
from fourdgen.data.datamodules import GridDataModule
from fourdgen.data.embeddings import ConditionEmbedder
from fourdgen.data.grid_augment import HomographyGridDataset, MixedGridDataset, StaticGridDataset
from fourdgen.data.scene import find_scenes


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
        mix: training-sample shares of (multi-view grids, homography grids, static grids)
            (:mod:`fourdgen.data.grid_augment`, 4Real-Video-V2's three data sources); validation,
            test and prediction always use plain multi-view grids. Mixed training batches carry no
            depth (homography views have none): for 4Real-Video-V2, which needs none.
        monocular_root: scenes whose clips feed the homography grids (None: view 0 of the training
            scenes). homography_strength: see :class:`~fourdgen.data.grid_augment.HomographyGridDataset`.
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
        mix: tuple[float, float, float] = (1.0, 0.0, 0.0),
        monocular_root: str | None = None,
        homography_strength: float = 0.15,
        crop: str = "random",
        load_depth: bool = True,
        samples_per_scene: int = 1,
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
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            synthetic=synthetic,
            num_synthetic_scenes=num_synthetic_scenes,
            batch_size=batch_size,
            num_workers=num_workers,
        )
        if len(mix) != 3 or min(mix) < 0 or sum(mix) <= 0:
            raise ValueError(f"mix: 3 non-negative shares (multi-view, homography, static), got {mix}")
        self.hparams.update(
            prompt_suffix=prompt_suffix,
            negative_prompt=negative_prompt,
            cache_dir=cache_dir,
            mix=list(mix),
            monocular_root=monocular_root,
            homography_strength=homography_strength,
        )
        self.embedder = ConditionEmbedder(
            text_encoder, image_encoder, prompt_suffix, negative_prompt, cache_dir
        )

    def _dataset(self, split: str) -> Dataset:
        h = self.hparams
        grids = super()._dataset(split)
        if split != "train" or list(h.mix) == [1.0, 0.0, 0.0]:
            return EmbeddedGrids(grids, self.embedder)
        # Homography views have no depth: no source loads it, so mixed batches collate.
        grids = super()._dataset(split, load_depth=False)
        V, T = h.num_views, h.num_frames
        mono_scenes = find_scenes(h.monocular_root) if h.monocular_root else None
        sources = [
            grids,
            HomographyGridDataset(
                super()._dataset(split, mono_scenes, num_views=1, load_depth=False),
                V,
                h.homography_strength,
                h.condition,
            ),
            StaticGridDataset(super()._dataset(split, num_frames=1, load_depth=False), T, h.condition),
        ]
        mix = MixedGridDataset(sources, list(h.mix), length=len(grids))
        return EmbeddedGrids(mix, self.embedder)
