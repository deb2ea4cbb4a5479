"""Every docstring example in the package runs."""

import doctest
import importlib
import pkgutil

import pytest

import peftjax

MODULES = sorted(m.name for m in pkgutil.walk_packages(peftjax.__path__, "peftjax."))


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
  try:
    module = importlib.import_module(name)
  except ModuleNotFoundError as e:  # an optional third-party extra; never a peftjax module
    if (e.name or "").startswith("peftjax"):
      raise
    pytest.skip(f"{name}: {e}")
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"


def test_design_doc_worked_example():
  """docs/design.md's worked example (a new node type and method) runs as written."""
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "docs" / "design.md"
  result = doctest.testfile(str(path), module_relative=False,
                            optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 10 and result.failed == 0, result
