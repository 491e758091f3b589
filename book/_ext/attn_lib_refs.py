"""Sphinx extension: ``attn_lib.<name>`` cross-references find re-exported names.

The API page documents every object where it is defined, for example
``attn_lib.masks.causal_mask``, while docstrings and chapters write the public
short name ``attn_lib.causal_mask``. When Sphinx cannot find such a target,
this looks the object up in the installed package and resolves the reference
to the name it is documented under.
"""

from __future__ import annotations

import importlib
from typing import Any


def canonical_name(target: str) -> str | None:
    """``attn_lib.causal_mask`` -> ``attn_lib.masks.causal_mask``; None if unknown."""
    parts = target.split(".")
    if parts[0] != "attn_lib" or len(parts) < 2:
        return None
    obj: Any = importlib.import_module("attn_lib")
    for part in parts[1:]:
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname:
        return None
    return f"{module}.{qualname}"


def _resolve(app, env, node, contnode):
    """Sphinx's ``missing-reference`` handler for the Python domain."""
    if node.get("refdomain") != "py":
        return None
    target = canonical_name(node["reftarget"])
    if target is None or target == node["reftarget"]:
        return None
    domain = env.get_domain("py")
    return domain.resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], target, node, contnode
    )


def setup(app):
    app.connect("missing-reference", _resolve)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
