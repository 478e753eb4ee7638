"""fourdgen's own error types: the ones the CLI prints as one line (traceback with ``--debug``).

Each also derives from the built-in type that callers already catch (``ValueError``,
``FileExistsError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class FourDGenError(Exception):
    """A problem with the user's input, config or files, described by its message."""


class ConfigError(FourDGenError, ValueError):
    """A config value is missing or wrong; the message names the key and the expected value."""


class FileFormatError(FourDGenError, ValueError):
    """A user's file (scene, image, video, weights export, PLY) does not hold what it should: the
    message names the file, the field (a JSON key, a tensor name, a PLY property) and the expectation."""

    def __init__(self, file, field: str, expected: str, got=None):
        self.file, self.field, self.expected, self.got = str(file), field, expected, got
        msg = f"{file}: field '{field}': expected {expected}"
        if got is not None:
            msg += f", got {got}"
        super().__init__(msg)


def short_error(e: BaseException) -> str:
    """The first line of a library's error message (at most 120 characters), or its type's name."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:120] or type(e).__name__


class OutputExistsError(FourDGenError, FileExistsError):
    """Writing would replace files that fourdgen did not write, or a longer run's outputs."""
