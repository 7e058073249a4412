"""Shared fixtures; puts tests/ on sys.path so tests import helper modules by name."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# Built tokenizers are cached (outlast.serve.tokenizer): the run gets a cache of its own, shared
# by its server subprocesses through the environment, and never touches the user's ~/.cache.
if "OUTLAST_CACHE_DIR" not in os.environ:
    os.environ["OUTLAST_CACHE_DIR"] = tempfile.mkdtemp(prefix="outlast-test-cache-")
    atexit.register(shutil.rmtree, os.environ["OUTLAST_CACHE_DIR"], True)

# Fail the run on any skip or xfail nobody allowed (tests/skip_guard.py).
# Remove each passed test's tmp_path at once (tests/disk_guard.py).
pytest_plugins = ["skip_guard", "disk_guard"]


@pytest.fixture
def ckpt_dir(tmp_path):
    return str(tmp_path / "ckpt")
