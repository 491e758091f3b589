"""Every ``Example:`` in attn_lib's docstrings runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import pytest

import attn_lib

SLOW = {"attn_lib.bench"}  # its example runs a benchmark in fresh processes
MODULES = sorted(
    m.name
    for m in pkgutil.iter_modules(attn_lib.__path__, "attn_lib.")
    if m.name not in SLOW
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed"
