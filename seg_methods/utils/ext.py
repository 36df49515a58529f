"""Access to the compiled extension ``seg_methods._C`` without making it a hard requirement.

``import seg_methods`` and CPU training work without the extension: each op's Python wrapper
asks :func:`has_op` and falls back to its pure-PyTorch reference. Only ``ImportError`` is caught;
any other failure (a broken build, a kernel error) propagates.
"""
import importlib
from typing import Optional

import torch

_ext = None
_ext_error: Optional[str] = None
_loaded = False


def load_extension():
    """Import ``seg_methods._C`` once. Returns the module, or None when it is not built."""
    global _ext, _ext_error, _loaded
    if not _loaded:
        _loaded = True
        try:
            _ext = importlib.import_module("seg_methods._C")
        except ImportError as e:
            _ext, _ext_error = None, str(e)
    return _ext


def extension_error() -> Optional[str]:
    """Why the extension could not be imported (None when it is available)."""
    load_extension()
    return _ext_error


def has_op(name: str) -> bool:
    """Whether ``torch.ops.seg_methods.<name>`` is registered by the compiled extension."""
    if load_extension() is None:
        return False
    return hasattr(torch.ops.seg_methods, name)


def ext_has_cuda() -> bool:
    ext = load_extension()
    return bool(ext is not None and ext.has_cuda())


def list_ops():
    """Names of the ops registered under ``torch.ops.seg_methods`` (empty without the build)."""
    if load_extension() is None:
        return []
    names = []
    for schema in torch._C._jit_get_all_schemas():
        if schema.name.startswith("seg_methods::"):
            names.append(schema.name.split("::", 1)[1])
    return sorted(set(names))
