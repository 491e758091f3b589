"""The book's build helpers and the browser check's verdicts, without a browser."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book" / "_ext"))

import attn_lib_refs  # noqa: E402
import browser_check  # noqa: E402
import dedupe_scripts  # noqa: E402


@pytest.mark.parametrize(
    ("short", "documented"),
    [
        ("attn_lib.causal_mask", "attn_lib.masks.causal_mask"),
        ("attn_lib.attention", "attn_lib.functional.attention"),
        ("attn_lib.KVCache.update", "attn_lib.cache.KVCache.update"),
    ],
)
def test_reexported_names_resolve_to_their_defining_module(short, documented):
    assert attn_lib_refs.canonical_name(short) == documented


@pytest.mark.parametrize(
    "target", ["attn_lib.no_such_name", "torch.Tensor", "attn_lib"]
)
def test_unknown_targets_are_left_alone(target):
    assert attn_lib_refs.canonical_name(target) is None


def test_repeated_inline_scripts_are_dropped_in_order():
    from sphinx.builders.html._assets import _JavaScript

    body = "const X = 1"
    scripts = [
        _JavaScript(None, body=body),
        _JavaScript("a.js"),
        _JavaScript("", body=body),
    ]
    context = {"script_files": scripts}
    dedupe_scripts._drop_repeated_scripts(None, "page", "page.html", context, None)
    assert context["script_files"] == scripts[:2]


def _page(links=(), ids=(), **extra):
    info = {
        "math": 0,
        "mathjax": True,
        "untypeset": [],
        "mathErrors": [],
        "rawTex": [],
        "images": [],
        "errors": [],
        "traceback": False,
        "links": list(links),
        "ids": list(ids),
        "colab": [],
        "downloads": [],
    }
    info.update(extra)
    return info


def test_broken_links_finds_missing_files_and_anchors(tmp_path):
    base = "http://127.0.0.1:1/"
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "a.html").write_text("a")
    (tmp_path / "index.html").write_text("i")
    pages = {
        "book/a.html": _page(
            links=[
                f"{base}book/a.html#here",
                f"{base}book/a.html#gone",
                f"{base}book/missing.html",
                f"{base}",
                "https://example.org/x",
            ],
            ids=["here"],
        ),
        "index.html": _page(),
    }
    broken = browser_check.broken_links(pages, tmp_path, base)
    assert broken == {
        "book/a.html": [
            f"missing anchor: {base}book/a.html#gone",
            f"missing file: {base}book/missing.html",
        ]
    }


def test_a_notebook_page_needs_colab_and_download_links(tmp_path):
    (tmp_path / "_sources" / "book").mkdir(parents=True)
    (tmp_path / "_sources" / "book" / "ch.ipynb").write_text("{}")
    problems = browser_check.page_problems("book/ch.html", _page(), tmp_path, "main/")
    assert any("no Colab launch link" in p for p in problems)
    assert any("no download button" in p for p in problems)
    ok = _page(
        colab=["https://colab.research.google.com/github/o/r/blob/main/book/ch.ipynb"],
        downloads=["http://127.0.0.1:1/_sources/book/ch.ipynb"],
    )
    assert browser_check.page_problems("book/ch.html", ok, tmp_path, "main/") == []


def test_untypeset_math_images_and_errors_are_reported(tmp_path):
    info = _page(
        math=2,
        mathjax=False,
        untypeset=["x"],
        rawTex=["$y$"],
        images=[{"src": "a.png", "ok": False}],
        errors=["output traceback"],
        traceback=True,
    )
    problems = browser_check.page_problems("p.html", info, tmp_path, "main/")
    assert len(problems) == 6
