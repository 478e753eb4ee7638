"""Console-script entry points: fourdgen's own errors as one line, the traceback on request.

Shared by ``fourdgen`` and ``fourdgen-synth``. An error is fourdgen's own when it is a
:class:`~fourdgen.errors.FourDGenError`, Lightning's ``MisconfigurationException``, or a built-in
type raised by a ``raise`` statement in fourdgen's code (its message was written for the user).
The same type from inside torch is a bug report and keeps its traceback.
"""

from __future__ import annotations

import dis
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException

from fourdgen.errors import FourDGenError

_PKG_DIR = Path(__file__).resolve().parent
_DEBUG_HINT = "(run with --debug or FOURDGEN_DEBUG=1 for the traceback)"
_OWN_TYPES = (
    ValueError,
    TypeError,
    KeyError,
    FileNotFoundError,
    FileExistsError,
    FloatingPointError,
    NotImplementedError,
    RuntimeError,
)


# Lines of jsonargparse's Union/subclass error messages that repeat the type lists, not the problem.
PARSE_NOISE = (
    "Does not validate against any of the",
    "Subtypes:",
    "Errors:",
    "Given value",
    "Expected a <class 'NoneType'>",
)


def condense_parse_error(message: str, limit: int = 600) -> str:
    """jsonargparse's nested error message on one line: the keys and the problem, not the type lists."""
    lines = (line.strip().removeprefix("- ") for line in message.splitlines())
    text = " ".join(line for line in lines if line and not line.startswith(PARSE_NOISE))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def is_own_error(e: BaseException) -> bool:
    """Whether ``e`` describes a problem for the user to fix, so its message alone says it all."""
    if isinstance(e, FourDGenError | MisconfigurationException):
        return True
    if not isinstance(e, _OWN_TYPES) or e.__traceback__ is None:
        return False
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    # A ``raise`` statement in fourdgen's code, not a failing call from it (a torch op, a dict lookup).
    is_raise = (
        0 <= tb.tb_lasti < len(code.co_code) and dis.opname[code.co_code[tb.tb_lasti]] == "RAISE_VARARGS"
    )
    return is_raise and Path(code.co_filename).resolve().is_relative_to(_PKG_DIR)


def error_message(e: BaseException) -> str:
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        return e.args[0]  # str(KeyError) is the repr of its argument
    return str(e) or type(e).__name__


def run_entry(entry: Callable[[list[str] | None], Any], args: list[str] | None = None) -> None:
    """Run ``entry(argv)`` (argv None: it reads ``sys.argv``) with one-line errors and exit code 1.

    ``--debug`` is taken out of the arguments; it, or ``FOURDGEN_DEBUG=1``, lets errors raise with
    their traceback. It is passed on through the environment, so DDP's child ranks and jsonargparse
    see it too.
    """
    from_argv = args is None
    argv = list(sys.argv[1:] if from_argv else args)
    debug = "--debug" in argv or env_flag("FOURDGEN_DEBUG")
    argv = [a for a in argv if a != "--debug"]
    if from_argv:
        sys.argv[1:] = argv  # DDP re-launches sys.argv for the other ranks
    saved = {k: os.environ.get(k) for k in ("FOURDGEN_DEBUG", "JSONARGPARSE_DEBUG")}
    if debug:
        os.environ.update(FOURDGEN_DEBUG="1", JSONARGPARSE_DEBUG="true")
    try:
        entry(None if from_argv else argv)
    except Exception as e:
        if debug or not is_own_error(e):
            raise
        print(f"fourdgen: error: {error_message(e)}\n{_DEBUG_HINT}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
