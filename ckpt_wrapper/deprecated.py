"""Old import paths that still work, with a ``FutureWarning``: each names where its contents moved.

Example:
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     from ckpt_wrapper.models import GPTConfig
    >>> GPTConfig.__module__, caught[0].category.__name__
    ('ckpt_wrapper.testing.models', 'FutureWarning')
"""

from __future__ import annotations

import importlib
import sys
import warnings

__all__ = ["MOVED", "moved"]

MOVED = {
    "ckpt_wrapper.models": "ckpt_wrapper.testing.models",
    "ckpt_wrapper.recompute": "ckpt_wrapper.cheap_recompute",
    "ckpt_wrapper.cli": "ckpt_wrapper.tools.cli",
    "ckpt_wrapper.demo": "ckpt_wrapper.tools.demo",
    "ckpt_wrapper.bench": "ckpt_wrapper.tools.bench",
}
"""Old module path -> new module path, for the paths users may have written."""


def moved(old: str) -> None:
    """Replace the module ``old`` in ``sys.modules`` by the module it moved to, warning once.

    Called by the stub left at each old path; afterwards ``import old`` gives the new module itself.
    """
    new = MOVED[old]
    warnings.warn(
        f"{old} moved to {new}; import it from there (the old path will be removed in a future release).",
        FutureWarning,
        stacklevel=3,
    )
    sys.modules[old] = importlib.import_module(new)
