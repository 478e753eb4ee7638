"""The fitter's novel views: the interpolated camera path, its renders for the novel-view
regularisers (:mod:`fourdgen.gaussians.regularizers`: FMD, the coverage term, the warp) and the
scene clips those regularisers are set up with.

A mixin of :class:`~fourdgen.stages.fit.Gaussian4DFitter`: it reads the fitter's ``info``
(:class:`~fourdgen.data.protocols.SceneInfo`), ``render``, ``_regularizers``, ``hparams``
(``path_samples``, ``regularize_every``) and the step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fourdgen.batch import GridBatch
from fourdgen.data.protocols import SourceClipSource, check_datamodule
from fourdgen.errors import ConfigError
from fourdgen.gaussians.regularizers import NovelViewRegularizer, NovelViewRender, SourceClip
from fourdgen.geometry.interpolation import interpolate_loop
from fourdgen.stages.common import step_generator


class NovelViews:
    """Path cameras, their renders and the regularisers' losses on them."""

    def _setup_regularizers(self, dm) -> None:
        """Hand each regulariser the clips it asks for (``needs_source``, ``needs_views``)."""
        for r in self._regularizers:
            r.setup(self._source_clip(dm, r) if r.needs_source else None)
            if r.needs_views:
                where = f"model.regularizers ({type(r).__name__})"
                check_datamodule(dm, SourceClipSource, f"{where} (e.g. with SceneFramesDataModule)")
                try:
                    r.setup_views([self._clip(dm, v) for v in self.info.train_views])
                except ValueError as e:
                    raise ConfigError(f"{where}, scene {getattr(dm, 'root', '?')}: {e}") from None

    def _source_clip(self, dm, reg: NovelViewRegularizer) -> SourceClip:
        """The scene's input video for ``reg`` (its ``source_view``, else the scene's)."""
        info = self.info
        view = getattr(reg, "source_view", None)
        view = info.source_view if view is None else view
        where = f"model.regularizers ({type(reg).__name__})"
        if view is None:
            raise ConfigError(
                f"{where}: which view is the input video? The scene states none (scene.json "
                "'source_view', written by GridVideoWriter); set source_view in its init_args"
            )
        if not 0 <= view < len(info.K):
            raise ConfigError(
                f"{where}: source_view {view} is not a view of the scene (0..{len(info.K) - 1})"
            )
        check_datamodule(dm, SourceClipSource, f"{where} (e.g. with SceneFramesDataModule)")
        return self._clip(dm, view)

    def _clip(self, dm, view: int) -> SourceClip:
        """View ``view`` of the scene as a :class:`SourceClip` (``dm``: a SourceClipSource)."""
        info = self.info
        clip = dm.view_clip(view)
        return SourceClip(
            rgb=clip["rgb"],
            depth=clip.get("depth"),
            K=info.K[view],
            w2c=info.w2c[view],
            times=info.times,
            view=view,
            caption=info.caption,
            rig=info.w2c[:, 0],
        )

    def camera_path(self, num: int | None = None) -> tuple[Tensor, Tensor]:
        """Interpolated loop through the training cameras: ``K [3, 3]``, ``w2c [num, 4, 4]``.

        Kept per (scene, size, device): the spline runs on the host, and a regularised step
        would otherwise copy the cameras there and back (a host sync on CUDA) every time."""
        info, num = self.info, num or self.hparams.path_samples
        cache = self.__dict__.setdefault("_paths", {})
        hit = cache.get(num)
        if hit is not None and hit[0] is info and hit[1] == self.device:
            return hit[2]
        w2c = info.w2c[info.train_views, 0].to(self.device)
        up = -w2c[:, 1, :3].mean(0)  # cameras' average "up" (OpenCV y points down)
        path, _ = interpolate_loop(w2c, num_samples=num, up=up)
        cache[num] = (info, self.device, (info.K[info.train_views[0]].to(self.device), path))
        return cache[num][2]

    def _add_regularization(self, batch: GridBatch, loss: Tensor, losses: dict[str, Tensor]) -> Tensor:
        """``loss`` plus the weighted terms of the regularisers due at this step (each also put in
        ``losses`` as ``reg_<name>``); one novel-view render serves all of them."""
        step = self.global_step
        due = step % self.hparams.regularize_every == 0
        active = [r for r in self._regularizers if r.due(step)] if due else []
        if active:
            wants = [r.frames for r in active]
            novel = self._render_novel_view(batch, None if None in wants else max(wants))
            for r in active:
                value = r(novel)
                losses[f"reg_{r.name}"] = value
                loss = loss + r.weight * value
        return loss

    def _render_novel_view(self, batch: GridBatch, frames: int | None = None) -> NovelViewRender:
        """The clip (or ``frames`` random frames of it, in time order) from a path camera."""
        K, path = self.camera_path()
        # Drawn from (seed, step), not the global RNG: a resumed fit samples the same cameras.
        gen = step_generator(self.global_step)
        idx = int(torch.randint(len(path), (1,), generator=gen))
        times, picked = self.info.times, None
        if frames is not None and frames < len(times):
            picked = torch.randperm(len(times), generator=gen)[:frames].sort().values
            times = times[picked]
        times = times.to(self.device)
        outs = [self.render(t, K[None], path[idx : idx + 1]) for t in times]
        cat = lambda key: torch.cat([getattr(o, key) for o in outs]).permute(0, 3, 1, 2)  # noqa: E731
        return NovelViewRender(
            rgb=cat("rgb"),
            alpha=cat("alpha"),
            depth=cat("depth"),
            K=K,
            w2c=path[idx],
            times=times,
            step=self.global_step,
            batch=batch,
            frames=picked,
        )
