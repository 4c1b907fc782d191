"""The import layering of docs/architecture.md: no module imports a floor above its own.

Floors, bottom up: the ground (``registry``, ``compile_support``, ``_validate``), the quantizer
math (``quant``), the layers (``nn``), the rest of the library (``optim``, ``models``, ``rules``,
``data``, ``deploy``), the run layer (``run``), the harness (``bench``), the command line
(``cli``). Every import counts, function-level ones included.
"""

import ast
from pathlib import Path

import pytest

import chimera

ROOT = Path(chimera.__file__).parent
FLOORS = {
    "registry": 0, "compile_support": 0, "_validate": 0,
    "quant": 1,
    "nn": 2,
    "optim": 3, "models": 3, "rules": 3, "data": 3, "deploy": 3,
    "run": 4,
    "bench": 5,
    "cli": 6, "__main__": 6,
}
LIBRARY_TOP = 3


def _package(module: str) -> str:
    """``chimera.bench.perf.timing`` -> ``bench``; ``chimera`` itself -> ``chimera``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _floor(package: str) -> int:
    if package == "chimera":  # the public API re-exports the library
        return LIBRARY_TOP
    return FLOORS.get(package, max(FLOORS.values()) + 1)  # unknown (relative): above everything


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            names.append("chimera.<relative import>")  # no floor: fails the test below
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return [n for n in names if n == "chimera" or n.startswith("chimera.")]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__")


MODULES = sorted(ROOT.rglob("*.py"))


def test_every_package_has_a_floor():
    packages = {_package(_module_name(p)) for p in MODULES} - {"chimera"}
    assert packages <= FLOORS.keys(), f"give these packages a floor: {packages - FLOORS.keys()}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_upward_import(path):
    own = _package(_module_name(path))
    upward = []
    for name in _imports(path):
        target = _package(name)
        if name == "chimera":  # `import chimera` (the version): the library's public face
            target = "chimera"
        if _floor(target) > _floor(own):
            upward.append(name)
    assert not upward, f"{_module_name(path)} (floor {own}) imports from above: {upward}"


def test_the_checker_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from chimera.bench.report import tables\n")
    assert _imports(bad) == ["chimera.bench.report"]
    assert _floor(_package("chimera.bench.report")) > _floor("optim")
    relative = tmp_path / "relative.py"
    relative.write_text("from ..bench import workers\n")
    assert _floor(_package(_imports(relative)[0])) > _floor("cli")


def test_quant_is_pure_math_without_modules():
    for path in (ROOT / "quant").glob("*.py"):
        assert not [n for n in _imports(path) if _package(n) not in ("quant", "_validate")]
