"""Integrations with other libraries, each optional: nothing here is imported by `import leanops`
unless the other library is already loaded, and none of them is a leanops dependency.

- transformers: `register_transformers()` makes `attn_implementation="leanops"` (and
  "leanops_int8", int8 attention that trains) available to Hugging Face models (see
  leanops.integrations.transformers).
"""

from leanops.integrations.transformers import register_transformers

__all__ = ["register_transformers"]
