"""The examples in the docstrings run and print what they show."""

import doctest
import importlib
import pkgutil

import pytest

import jaxbn

MODULES = sorted(
    name for _, name, _ in pkgutil.walk_packages(jaxbn.__path__, prefix="jaxbn.")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
  assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"


def test_the_public_functions_show_an_example():
  for name in jaxbn.__all__:
    obj = getattr(jaxbn, name)
    if callable(obj) and not isinstance(obj, type) and obj.__doc__:
      assert ">>>" in obj.__doc__, f"jaxbn.{name} has no example"
