"""The scene of a running stage-3 fit in the browser (``fourdgen view`` while it trains).

The viewer shows a copy of the fitter, not the fitter: the browser's time slider and the
fly-through button evaluate the copy on the viewer's threads while training goes on. The copy is
brought up to date on the training thread every ``every_n_steps`` steps, and only while someone is
connected: with nobody there a step costs one modulo and a dict lookup (``benchmarks/RESULTS.md``,
"Viewer": the fit's overhead measured).
"""

from __future__ import annotations

import threading

import lightning as L
import torch
from torch import nn

from fourdgen.viewer.server import ViewerApp
from fourdgen.viewer.sources import FitterSource


def fitter_copy(module):
    """A frozen copy of a :class:`~fourdgen.stages.fit.Gaussian4DFitter`, rebuilt from its
    hyperparameters as ``load_from_checkpoint`` does (no LPIPS, not compiled), on its device."""
    hp = {k: v for k, v in dict(module.hparams).items() if not k.startswith("_")}
    copy = type(module)(**{**hp, "lpips_net": None, "compile": False})
    copy.info = module.info
    return copy.to(module.device).eval().requires_grad_(False)


@torch.no_grad()
def sync_fitter(dst, src) -> None:
    """Copy ``src``'s current scene into ``dst`` (the number of Gaussians may have changed)."""
    for k in list(dst.splats.keys()):
        if k not in src.splats:
            del dst.splats[k]
    for k, v in src.splats.items():
        dst.splats[k] = nn.Parameter(v.detach().clone(), requires_grad=False)
    if src.deformation is not None:
        dst.deformation.load_state_dict(src.deformation.state_dict())
    for name in ("trained_steps", "bg", "scene_scale"):
        getattr(dst, name).copy_(getattr(src, name))


class LiveViewer(L.Callback):
    """Serve the fitting scene with :class:`~fourdgen.viewer.server.ViewerApp` (rank 0 only).

    Args:
        host / port: where to listen (default this machine only; port 0: any free one).
        every_n_steps: refresh the shown scene this often, while a browser is connected.
        max_gaussians: at most this many Gaussians to the browser (the most opaque).
        out_dir: where the fly-through button writes its mp4 (default: the trainer's root dir).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8080,
        every_n_steps: int = 50,
        max_gaussians: int | None = None,
        out_dir: str | None = None,
    ):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"LiveViewer.every_n_steps: expected a positive number, got {every_n_steps}")
        self.host, self.port, self.every_n_steps = host, port, every_n_steps
        self.max_gaussians, self.out_dir = max_gaussians, out_dir
        self.app: ViewerApp | None = None
        self.syncs = 0  # how often the copy was refreshed (what an idle viewer must not do)
        self._copy = None
        self._lock = threading.Lock()
        self._joined = threading.Event()  # a browser connected since the last refresh

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._copy = fitter_copy(pl_module)
        self._sync(pl_module)
        source = FitterSource(self._copy, trainer.default_root_dir, lock=self._lock)
        source.kind = "live fit"
        self.app = ViewerApp(
            source,
            host=self.host,
            port=self.port,
            max_gaussians=self.max_gaussians,
            out_dir=self.out_dir or trainer.default_root_dir,
            path_samples=pl_module.hparams.path_samples,
            device=str(pl_module.device),
            verbose=False,
        )
        self.app.server.on_client_connect(lambda _: self._joined.set())
        print(f"fourdgen: live viewer of the fit at {self.app.url}", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        app = self.app
        if app is None:
            return
        due = trainer.global_step % self.every_n_steps == 0 or self._joined.is_set()
        if due and app.server.get_clients():  # nobody looking: nothing to do
            self._joined.clear()
            self._sync(pl_module)
            app.refresh()

    def _sync(self, pl_module) -> None:
        with self._lock:
            sync_fitter(self._copy, pl_module)
        self.syncs += 1

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.app is not None and self.app.server.get_clients():
            self._sync(pl_module)  # the final scene, for whoever is still looking
            self.app.refresh()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self.app is not None:
            self.app.stop()
            self.app = None
