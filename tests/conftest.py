"""Shared pytest setup.

pytest skips directories named ``dist`` by default (``norecursedirs``), which would
silently drop tests/dist; collect it explicitly.
"""

from pathlib import Path


def pytest_ignore_collect(collection_path: Path, config):
    if collection_path.name == "dist" and collection_path.parent.name == "tests":
        return False
    return None
