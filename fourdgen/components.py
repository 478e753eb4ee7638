"""Components that remember how they were built, so a checkpoint can say which ones trained it.

A recipe picks components (couplings, conditionings, depth providers) by ``class_path``. Classes
deriving from :class:`Recorded` keep their constructor arguments, and :meth:`Recorded.spec` gives
``{"class_path": ..., "init_args": ...}``: the form recipes use, which the stages store in their
hyper-parameters and :func:`build` turns back into the object (``load_from_checkpoint`` and
``fourdgen validate --ckpt_path`` then rebuild the same components).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any


def _plain(value: Any) -> Any:
    if isinstance(value, Recorded):
        return value.spec()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class Recorded:
    """Mixin: the outermost ``__init__``'s arguments are kept for :meth:`spec`."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args: Any, **kw: Any) -> None:
            if "_init_args" not in self.__dict__:  # the subclass's call comes first; super()'s are inner
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                self._init_args = dict(list(bound.arguments.items())[1:])
            init(self, *args, **kw)

        cls.__init__ = recording_init

    def spec(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}`` of this object (nested components as specs)."""
        cls = type(self)
        return {
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "init_args": _plain(self.__dict__.get("_init_args", {})),
        }


def build(spec: Any) -> Any:
    """A component from its :meth:`Recorded.spec` (nested specs first); other values as they are."""
    if isinstance(spec, dict) and "class_path" in spec:
        module, _, name = spec["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return cls(**{k: build(v) for k, v in (spec.get("init_args") or {}).items()})
    return spec
