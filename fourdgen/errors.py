"""fourdgen's own error types: the ones the CLI prints as one line (traceback with ``--debug``).

Each also derives from the built-in type that callers already catch (``ValueError``,
``FileExistsError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class FourDGenError(Exception):
    """A problem with the user's input, config or files, described by its message."""


class ConfigError(FourDGenError, ValueError):
    """A config value is missing or wrong; the message names the key and the expected value."""


class OutputExistsError(FourDGenError, FileExistsError):
    """Writing would replace files that fourdgen did not write, or a longer run's outputs."""
