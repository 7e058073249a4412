"""The functional core's public face: ``save``, ``load``, ``read`` and their halves.

The code lives in modules with one reason to change each: :mod:`outlast.saving`
(flatten, plan, persist, commit), :mod:`outlast.loading` (match the live state, read,
restore), :mod:`outlast.shards` (the shard files' byte layout and writers). This module
re-exports what users and the rest of outlast import from it.
"""

from __future__ import annotations

from .loading import LoadReport, load, manifest_of, plan_load, read  # noqa: F401
from .saving import (  # noqa: F401
    PreparedSave,
    SaveReport,
    build_manifest,
    check_destination,
    describe_state,
    persist,
    prepare_flat,
    prepare_save,
    save,
    _signature,
)
from .shards import FileLayout, SaveItem, block_rows_for, layout_files, write_images, write_items  # noqa: F401

__all__ = ["save", "load", "read", "LoadReport", "SaveReport", "SaveItem", "prepare_save", "persist"]
