"""The product (``gemma4/``) stands on its own: it imports nothing from the harness (``harness/``) and never
reaches outside its package through ``__file__``.

slime imports ``gemma4`` inside its training actors, where the harness, the tests and the repository checkout
need not exist. Every ``gemma4/**/*.py`` is parsed (nothing is imported), so an import hidden in a function,
or built from a string for ``importlib.import_module`` / ``__import__``, is found too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PRODUCT = REPO / "gemma4"
FORBIDDEN = "harness"


def _is_forbidden(module: str | None) -> bool:
    return module is not None and (module == FORBIDDEN or module.startswith(FORBIDDEN + "."))


def _call_name(node: ast.Call) -> str:
    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr
    return func.id if isinstance(func, ast.Name) else ""


def harness_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, what)`` for every import of the harness in ``tree``: ``import harness...``, ``from harness...
    import``, and ``importlib.import_module("harness...")`` / ``__import__("harness...")`` with a literal."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if _is_forbidden(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and _is_forbidden(node.module):
                found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call) and _call_name(node) in ("import_module", "__import__") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and _is_forbidden(arg.value):
                found.append((node.lineno, f"{_call_name(node)}({arg.value!r})"))
    return found


def _parents_index(node: ast.AST) -> int | None:
    """``k`` for ``<expr>.parents[k]`` with a literal ``k``."""
    if (
        isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "parents"
        and isinstance(node.slice, ast.Constant)
        and isinstance(node.slice.value, int)
    ):
        return node.slice.value
    return None


def _mentions_file(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Name) and n.id == "__file__" for n in ast.walk(node))


def escapes_package(tree: ast.AST, depth: int) -> list[tuple[int, str]]:
    """``(line, what)`` for every use of ``__file__`` that climbs above the ``gemma4`` package: a module
    ``depth`` directories below it may go up ``depth`` levels (``Path(__file__).parents[depth - 1]`` is the
    package itself); ``parents[k]`` with ``k >= depth``, ``.parent.parent...`` chains as long, and
    ``os.path.dirname`` nested as deep are refused."""
    found = []
    for node in ast.walk(tree):
        k = _parents_index(node)
        if k is not None and k >= depth and _mentions_file(node.value):
            found.append((node.lineno, f"__file__ ... .parents[{k}]"))
        if isinstance(node, ast.Attribute) and node.attr == "parent":
            chain, inner = 0, node
            while isinstance(inner, ast.Attribute) and inner.attr == "parent":
                chain, inner = chain + 1, inner.value
            if chain > depth and _mentions_file(inner):
                found.append((node.lineno, f"__file__ ... {'.parent' * chain}"))
        if isinstance(node, ast.Call) and _call_name(node) == "dirname":
            chain, inner = 0, node
            while isinstance(inner, ast.Call) and _call_name(inner) == "dirname" and inner.args:
                chain, inner = chain + 1, inner.args[0]
            if chain > depth and _mentions_file(inner):
                found.append((node.lineno, f"dirname x{chain} of __file__"))
    return sorted(set(found))


def _modules() -> list[Path]:
    return sorted(PRODUCT.rglob("*.py"))


def _violations(check) -> list[str]:
    out = []
    for path in _modules():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        depth = len(path.relative_to(PRODUCT).parts)  # gemma4/x.py: 1; gemma4/conversion/x.py: 2
        for line, what in check(tree, depth):
            out.append(f"{path.relative_to(REPO)}:{line}: {what}")
    return out


def test_the_product_imports_nothing_from_the_harness():
    bad = _violations(lambda tree, depth: harness_imports(tree))
    assert not bad, "gemma4/ must not import harness/ (slime imports gemma4 without it):\n" + "\n".join(bad)


def test_the_product_never_reaches_outside_its_package_through_file():
    bad = _violations(escapes_package)
    assert not bad, "gemma4/ must not find files outside the package via __file__:\n" + "\n".join(bad)


def test_the_walk_sees_the_product():
    assert len(_modules()) > 20 and PRODUCT / "config.py" in _modules()


@pytest.mark.parametrize(
    "source",
    [
        "import harness\n",
        "import harness.testing.chat as c\n",
        "from harness.reference_data import REPO_ROOT\n",
        "def f():\n    from harness import presets\n",
        "import importlib\nimportlib.import_module('harness.presets')\n",
        "from importlib import import_module\nimport_module('harness')\n",
        "__import__('harness.cli')\n",
    ],
)
def test_every_form_of_harness_import_is_caught(source):
    assert harness_imports(ast.parse(source)), source


@pytest.mark.parametrize(
    "source", ["import harnesses\n", "from .harness import x\n", "from gemma4 import harness_like\n"]
)
def test_lookalikes_are_not_harness_imports(source):
    assert harness_imports(ast.parse(source)) == [], source


@pytest.mark.parametrize(
    "source,depth,bad",
    [
        ("from pathlib import Path\nROOT = Path(__file__).resolve().parents[2]\n", 2, True),
        ("from pathlib import Path\nROOT = Path(__file__).resolve().parents[1]\n", 1, True),
        ("from pathlib import Path\nHERE = Path(__file__).resolve().parents[1]\n", 2, False),
        ("from pathlib import Path\nROOT = Path(__file__).parent.parent.parent\n", 2, True),
        ("from pathlib import Path\nHERE = Path(__file__).parent\n", 1, False),
        ("import os\nROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))\n", 2, True),
        ("from pathlib import Path\nX = Path('a/b/c').parents[3]\n", 1, False),
    ],
)
def test_escaping_the_package_is_caught(source, depth, bad):
    assert bool(escapes_package(ast.parse(source), depth)) is bad, source
