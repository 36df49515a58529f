"""Load a script of this repository (tools/*.py, demo/demo.py, ...) as a module, for tests.

Importable from every test file: pytest puts ``tests/`` (the folder of the root conftest.py) on
``sys.path``.
"""

import importlib.util
import os
from types import ModuleType
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(relpath: str, name: Optional[str] = None) -> ModuleType:
    """Execute ``REPO/relpath`` as a fresh module called ``name`` (default: the file's stem)."""
    path = os.path.join(REPO, relpath)
    name = name or os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
