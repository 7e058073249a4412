"""Shared fixtures; puts tests/ on sys.path so tests import helper modules by name."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# Fail the run on any skip or xfail nobody allowed (tests/skip_guard.py).
pytest_plugins = ["skip_guard"]


@pytest.fixture
def ckpt_dir(tmp_path):
    return str(tmp_path / "ckpt")
