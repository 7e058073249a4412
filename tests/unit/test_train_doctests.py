"""The Examples in outlast.train docstrings are run, so they cannot drift from the code."""

import doctest

import pytest

from outlast.train import balance, config, data, model, packing


@pytest.mark.parametrize("module", [model, data, packing, balance, config], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4 and result.failed == 0
