"""The public API is documented argument by argument: every name in leanops.__all__ (and, for
the submodules listed there, leanops.ops / leanops.qat / leanops.integrations, every name in
their __all__), and every public method a public class defines itself (from_linear, ...), has a
docstring that names each of its parameters. A class's parameters are its constructor's.
Methods a class inherits or overrides from nn.Module or a base class are documented there.
"""

import inspect
import re

import leanops
import pytest
import torch


def _public():
    found = {}

    def add(prefix, module):
        for name in module.__all__:
            obj = getattr(module, name)
            found[f"{prefix}.{name}"] = obj
            if inspect.ismodule(obj) and hasattr(obj, "__all__"):
                add(f"{prefix}.{name}", obj)

    add("leanops", leanops)
    return found


def _callables():
    """(qualified name, object) of every public function, class and class-defined method."""
    out = []
    for name, obj in sorted(_public().items()):
        if inspect.ismodule(obj) or not callable(obj):
            continue
        out.append((name, obj))
        if inspect.isclass(obj):
            inherited = set(dir(torch.nn.Module))
            for base in obj.__mro__[1:]:
                inherited |= set(vars(base))
            for attr, value in vars(obj).items():
                fn = value.__func__ if isinstance(value, classmethod | staticmethod) else value
                if not attr.startswith("_") and attr not in inherited and inspect.isfunction(fn):
                    out.append((f"{name}.{attr}", getattr(obj, attr)))
    return out


def _parameters(obj) -> list[str]:
    sig = inspect.signature(obj)
    return [p.name for p in sig.parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in ("self", "cls")]


def test_the_walk_covers_the_api():
    names = dict(_callables())
    for expected in ("leanops.quantize_", "leanops.attention", "leanops.ops.int4_weight_mm",
                     "leanops.Int4WeightOnlyConfig", "leanops.SemiSparseConfig",
                     "leanops.Int4WeightOnlyLinear.from_linear", "leanops.qat.prepare_",
                     "leanops.integrations.register_transformers", "leanops.use_backend"):
        assert expected in names
    assert len(names) >= 40


@pytest.mark.parametrize("name,obj", _callables(), ids=lambda v: v if isinstance(v, str) else "")
def test_public_name_documents_each_parameter(name, obj):
    doc = obj.__doc__ if inspect.isclass(obj) else inspect.getdoc(obj)
    assert doc and doc.strip(), f"{name} has no docstring"
    missing = [p for p in _parameters(obj) if not re.search(rf"\b{re.escape(p)}\b", doc)]
    assert not missing, f"{name}'s docstring does not name its parameter(s) {missing}"
