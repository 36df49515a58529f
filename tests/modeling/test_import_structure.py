"""Import direction inside modeling/ (static checks of the source, nothing is imported).

* The matcher and the point-sampling / pairwise-cost functions sit below the criteria: they do not
  import the criterion package, so the set criterion can import the matcher at the top level.
* No import is hidden inside a function in modeling/ or layers/ (a hidden import usually hides an
  import cycle).
* Decoders do not import post-processing or meta-architectures; meta-architectures do not import
  names from decoder modules (they build decoders through the registries).
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "seg_methods"


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _imported_modules(path: Path):
    """(relative level, module) of every ``from ... import`` and every ``import`` in a file."""
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom):
            yield node.level, node.module or ""
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name


def _py(*parts):
    return sorted((PKG.joinpath(*parts)).glob("*.py"))


@pytest.mark.parametrize("name", ["matcher.py", "point_losses.py"])
def test_matcher_and_point_losses_do_not_import_the_criteria(name):
    modules = [m for _, m in _imported_modules(PKG / "modeling" / name)]
    assert not [m for m in modules if "criterion" in m], modules


@pytest.mark.parametrize(
    "path",
    [p for sub in ("modeling", "layers") for p in sorted((PKG / sub).rglob("*.py"))],
    ids=lambda p: str(p.relative_to(PKG)),
)
def test_no_function_level_imports(path):
    hidden = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    hidden.append(f"{node.name}:{inner.lineno}")
    assert not hidden, f"imports inside functions: {hidden}"


@pytest.mark.parametrize(
    "path",
    _py("modeling", "transformer_decoder") + _py("modeling", "pixel_decoder"),
    ids=lambda p: p.name,
)
def test_decoders_do_not_import_postprocessing_or_meta_archs(path):
    modules = [m for _, m in _imported_modules(path)]
    bad = [m for m in modules if m.split(".")[0] in ("postprocessing", "meta_arch")]
    assert not bad, bad


@pytest.mark.parametrize("path", _py("modeling", "meta_arch"), ids=lambda p: p.name)
def test_meta_archs_do_not_import_names_from_decoder_modules(path):
    bad = [
        m
        for level, m in _imported_modules(path)
        if level and m.split(".")[0] in ("transformer_decoder", "pixel_decoder") and "." in m
    ]
    assert not bad, f"{path.name} imports from decoder modules {bad}; share the helper instead"
