"""``fourdgen`` command line: LightningCLI with ``fit``, ``validate``, ``test``, ``predict``.

Models and DataModules are chosen by ``class_path`` (subclass mode), so a user's own
``LightningDataModule`` from their own package plugs in without touching fourdgen::

    fourdgen fit --config lightning_configs/quickstart.yaml
    fourdgen fit --config recipe.yaml --data.class_path my_pkg.MyDataModule --data.init_args.root /data
    fourdgen fit --config recipe.yaml --print_config
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningCLI


class FourDGenCLI(LightningCLI):
    """LightningCLI with fourdgen's defaults. Config errors are jsonargparse's own messages, which
    name the offending key; nothing here catches them."""

    def __init__(self, args: list[str] | dict[str, Any] | None = None, run: bool = True, **kwargs: Any):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})  # re-runs in one dir (Lightning#17115)
        super().__init__(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )


def main(args: list[str] | None = None) -> None:
    FourDGenCLI(args=args)


if __name__ == "__main__":
    main()
