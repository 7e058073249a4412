"""The Examples in outlast.offload docstrings are run, so they cannot drift from the code."""

import doctest
import tempfile

import pytest

from outlast.offload import files, host, layout, overlap, pool, stream
from outlast.storage.local import aligned_buffer


@pytest.mark.parametrize("module", [layout, pool, stream, overlap, host, files], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    globs = dict(vars(module), tempfile=tempfile, aligned_buffer=aligned_buffer, StateLayout=layout.StateLayout)
    result = doctest.testmod(module, globs=globs, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 1 and result.failed == 0
