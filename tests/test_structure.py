"""The package's structure: every import in pyext/leanops points down the layer list written in
leanops' package docstring (its only copy), and no modules import each other round a loop.

Imports are read from the source (ast), so lazy imports inside functions count too: an upward
import hidden in a function is the same design bug as one at the top of a file.
"""

import ast
import pathlib
import re

import leanops

ROOT = pathlib.Path(leanops.__file__).parent


def layers() -> list[set[str]]:
    """The layer list of leanops.__doc__: one set of top-level names per layer, top first."""
    doc = leanops.__doc__
    block = doc[doc.index("Layers, top to bottom") :].split("\n\n", 2)[1]
    out = []
    for line in block.splitlines():
        if re.match(r"    \S", line):  # a layer's first line; deeper indents continue it
            out.append({n.strip() for n in re.split(r"\s{2,}", line.strip())[0].split(",")})
    return out


def modules() -> dict[str, pathlib.Path]:
    """Dotted name -> file of every module in the package (packages as their __init__)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("leanops", *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: pathlib.Path, known) -> set[str]:
    """The leanops modules `name` imports (a `from pkg import x` of a submodule x names it)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "leanops"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + is_package]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "leanops":
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & known
            found |= subs or {target}
    return {t for t in found if t != name}


def graph():
    mods = modules()
    return mods, {name: imports(name, path, set(mods)) for name, path in mods.items()}


def layer_of(name: str, order: list[set[str]]) -> int:
    parts = name.split(".")
    key = "leanops" if len(parts) == 1 else parts[1]
    for i, names in enumerate(order):
        if key in names:
            return i
    raise AssertionError(f"{name} is in no layer of leanops.__doc__'s list: add it there")


def test_layer_list_names_every_top_level_module():
    order = layers()
    assert len(order) >= 5
    listed = set().union(*order)
    assert sum(len(names) for names in order) == len(listed), "a name is listed twice"
    mods, _ = graph()
    top = {"leanops"} | {n.split(".")[1] for n in mods if n != "leanops"}
    assert top == listed, f"unlisted: {sorted(top - listed)}, stale: {sorted(listed - top)}"


def test_imports_point_down_the_layers():
    order = layers()
    _, edges = graph()
    upward = [
        f"{src} (layer {layer_of(src, order)}) imports {dst} (layer {layer_of(dst, order)})"
        for src, dsts in sorted(edges.items())
        for dst in sorted(dsts)
        if layer_of(dst, order) < layer_of(src, order)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    """Cycles between modules. Importing a.b.c also runs the packages a and a.b, so those count
    as imported too, except the importer's own packages (a package importing its submodules,
    which import their siblings, is how packages work, not a loop)."""
    mods, edges = graph()
    full = {}
    for src, dsts in edges.items():
        own = {".".join(src.split(".")[:i]) for i in range(1, src.count(".") + 1)}
        full[src] = set()
        for dst in dsts:
            parts = dst.split(".")
            full[src] |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} - own - {src}
    full = {s: {d for d in ds if d in mods} for s, ds in full.items()}

    # Tarjan's strongly connected components; any with two or more modules is a loop.
    index, low, stack, on, loops = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in full[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                loops.append(sorted(comp))

    for v in sorted(full):
        if v not in index:
            visit(v)
    assert not loops, f"import cycles: {loops}"
