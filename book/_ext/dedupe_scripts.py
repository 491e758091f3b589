"""Sphinx extension: each inline script appears on a page once.

sphinx-thebe 0.3.1 registers its inline configuration script at a point where
Sphinx 7 adds it to the page twice, and the second copy throws
``SyntaxError: Identifier 'THEBE_JS_URL' has already been declared`` in the
reader's browser. This drops exact repeats of a script before the page is
written (Sphinx keeps the copy added first as ``None`` and the second as ``''``,
so its own check for repeats misses them).
"""

from __future__ import annotations


def _key(script) -> tuple:
    """What makes two script tags the same; an inline script's file is None or ''."""
    attributes = getattr(script, "attributes", {})
    return (
        getattr(script, "filename", script) or "",
        tuple(sorted(attributes.items())),
    )


def _drop_repeated_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if scripts:
        unique: dict[tuple, object] = {}
        for script in scripts:
            unique.setdefault(_key(script), script)
        context["script_files"] = list(unique.values())


def setup(app):
    app.connect("html-page-context", _drop_repeated_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
