"""The code that only runs on a GPU still names things that exist.

CI has no GPU, so the `cuda` tests and the GPU benchmarks never run there: a refactor that moves or
renames a leanops function breaks them silently until the next (rare, short) GPU window. This
test reads those files without running them and checks every leanops name they import and every
attribute they read from an imported leanops module (`A.gather_cache`, `leanops.attention_int8`)
against the installed package.
"""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = sorted(
    [*ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("examples/*.py")],
    key=str,
)


def _resolve(dotted: str):
    """The object a dotted leanops path names, importing modules on the way; AttributeError or
    ImportError if it does not exist."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        else:  # a submodule not yet imported by its package
            obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


def _leanops_references(tree: ast.AST):
    """(line, dotted name) for every leanops name the file imports or reads off an alias."""
    aliases: dict[str, str] = {}
    refs: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "leanops":
                    refs.append((node.lineno, a.name))
                    aliases[a.asname or a.name.split(".")[0]] = a.asname and a.name or "leanops"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] == "leanops":
                for a in node.names:
                    if a.name == "*":
                        continue
                    refs.append((node.lineno, f"{node.module}.{a.name}"))
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and isinstance(node.ctx, ast.Load)
        ):
            refs.append((node.lineno, f"{aliases[node.value.id]}.{node.attr}"))
    return refs


def _unresolved(refs) -> list:
    """The (line, dotted name) of refs that do not resolve."""
    bad = []
    for line, dotted in sorted(set(refs)):
        try:
            _resolve(dotted)
        except (ImportError, AttributeError):
            bad.append((line, dotted))
    return bad


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_every_leanops_name_exists(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    missing = [f"{path.name}:{line}: {dotted}" for line, dotted in _unresolved(_leanops_references(tree))]
    assert not missing, "names that no longer exist:\n" + "\n".join(missing)


def test_the_check_sees_a_missing_name():
    tree = ast.parse(
        "from leanops.ops import attention as A\nimport leanops\n"
        "A.reference_attention\nA.no_such_helper\nleanops.no_such_op\n"
    )
    refs = _leanops_references(tree)
    assert {"leanops.ops.attention.no_such_helper", "leanops.no_such_op"} <= {d for _, d in refs}
    assert sorted(d for _, d in _unresolved(refs)) == ["leanops.no_such_op", "leanops.ops.attention.no_such_helper"]
