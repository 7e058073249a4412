"""Old spellings of the public API that still work, each with a DeprecationWarning.

Kept in one place so the list of what is deprecated, and what replaces it, is short to
read and easy to delete in a later release.
"""

from __future__ import annotations

import sys
import types
import warnings
from typing import Any, Callable


def warn(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn that ``old`` is deprecated in favour of ``new`` (stacklevel: the caller's caller)."""
    warnings.warn(f"{old} is deprecated; use {new} instead", DeprecationWarning, stacklevel=stacklevel)


def make_module_callable(module_name: str, func: Callable[..., Any], old: str, new: str) -> None:
    """Let ``outlast.convert(...)`` / ``outlast.merge(...)`` keep working on the *module*.

    Until 0.2 these names were functions that shadowed their modules, so ``import
    outlast.merge`` and ``outlast.merge(...)`` meant different things depending on import
    order. Now the name is always the module; calling the module forwards to ``func`` and
    warns.
    """

    class _CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            warn(old, new)
            return func(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule
