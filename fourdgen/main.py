"""The ``fourdgen`` console script: ``generate`` chains the stages (:mod:`fourdgen.generate`),
``import`` converts datasets to scenes (:mod:`fourdgen.importers`), ``eval`` scores predictions on
the papers' protocols (:mod:`fourdgen.evaluation`), ``view`` shows a 4D scene in the browser
(:mod:`fourdgen.view`), ``export`` writes a checkpoint's LoRA adapter (:mod:`fourdgen.export`);
every other subcommand is LightningCLI (:class:`fourdgen.cli.FourDGenCLI`).

It sits above both so that :mod:`fourdgen.generate`, which runs each step through
``FourDGenCLI``, and the CLI do not import each other.
"""

from __future__ import annotations

import sys
from typing import Any

from fourdgen.entry import run_entry


def _dispatch(argv: list[str] | None) -> Any:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["generate"]:
        from fourdgen.generate.command import main as generate

        return generate(argv[1:])
    if argv[:1] == ["import"]:
        from fourdgen.importers.command import main as import_data

        return import_data(argv[1:])
    if argv[:1] == ["eval"]:
        from fourdgen.evaluation.command import main as evaluate

        return evaluate(argv[1:])
    if argv[:1] == ["export"]:
        from fourdgen.export import main as export

        return export(argv[1:])
    if argv[:1] == ["view"]:
        from fourdgen.view import main as view

        return view(argv[1:])
    from fourdgen.cli import FourDGenCLI

    return FourDGenCLI(args=argv)


def main(args: list[str] | None = None) -> None:
    """Console entry: fourdgen's own errors as one line and exit 1 (``--debug`` for the traceback)."""
    run_entry(_dispatch, args)


if __name__ == "__main__":
    main()
