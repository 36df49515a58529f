"""Clear errors for real datasets whose files are missing.

Each real dataset is registered with the list of paths its loader needs and a text drawing of the
expected layout. When a path is missing, ``DatasetCatalog.get(name)`` raises
:class:`DatasetLayoutError` naming the missing path, the expected layout and ``datasets/README.md``
instead of a bare ``AssertionError`` or ``FileNotFoundError`` deep inside a loader.
"""

import functools
import os
from typing import Callable, List, Sequence

from detectron2.data import DatasetCatalog

__all__ = [
    "DatasetLayoutError",
    "datasets_root",
    "check_layout",
    "register_checked",
    "add_layout_check",
]


class DatasetLayoutError(FileNotFoundError):
    """A registered real dataset is not (fully) present under ``$DETECTRON2_DATASETS``."""


def datasets_root() -> str:
    """``$DETECTRON2_DATASETS`` (default ``./datasets``), as detectron2's builtin datasets use."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def check_layout(name: str, required: Sequence[str], layout: str) -> None:
    """Raise :class:`DatasetLayoutError` if any path in ``required`` does not exist.

    Args:
        name (str): registered dataset name (for the message).
        required (Sequence[str]): files or folders the loader reads.
        layout (str): drawing of the expected tree under ``$DETECTRON2_DATASETS``.
    """
    missing: List[str] = [p for p in required if not os.path.exists(p)]
    if missing:
        raise DatasetLayoutError(
            f"Dataset '{name}' is not available: missing {', '.join(missing)}.\n"
            f"Expected layout under $DETECTRON2_DATASETS (now '{datasets_root()}'):\n"
            f"{layout.rstrip()}\n"
            "See datasets/README.md for download links and the preparation scripts."
        )


def register_checked(
    name: str, loader: Callable[[], list], required: Sequence[str], layout: str
) -> None:
    """``DatasetCatalog.register(name, ...)`` with a layout check before ``loader`` runs."""

    def load():
        check_layout(name, required, layout)
        return loader()

    DatasetCatalog.register(name, load)


def add_layout_check(name: str, required: Sequence[str], layout: str) -> None:
    """Put a layout check in front of a dataset that detectron2 already registered.

    The original loading function is kept (we reuse detectron2's loaders, not duplicate them).
    Does nothing if ``name`` is not registered.
    """
    if name not in DatasetCatalog:
        return
    original = DatasetCatalog[name]
    if getattr(original, "_seg_methods_checked", False):
        return

    @functools.wraps(original)
    def load():
        check_layout(name, required, layout)
        return original()

    load._seg_methods_checked = True
    DatasetCatalog.remove(name)
    DatasetCatalog.register(name, load)
