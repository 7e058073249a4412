"""Keep the suite's disk footprint to one test at a time.

pytest keeps every test's ``tmp_path`` until the session ends (and the last runs' after it), and
this suite writes real checkpoints, model conversions and crash loops: kept, one run grew to
23 GB and a CI run on a nearly full disk failed with ENOSPC. Here a test's ``tmp_path`` is removed
as soon as the test has passed; a failed test's stays for inspection (pyproject keeps failed
tests' folders of the last run only). The run also refuses to start on a disk with less free space
than its largest test needs, instead of failing halfway with errors that look like bugs.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# Measured per test (du of tmp_path after it, whole suite): the two offload memory proofs
# (tests/e2e/test_offload_memory.py) write 9.2 GB each (a state 3x a 1.3 GiB memory limit, and its
# checkpoint), the real-model serving tests 0.5-1 GB, everything else < 0.35 GB; module- and
# session-scoped fixtures (converted model, Hugging Face copy, DeepSpeed references) add ~1.5 GB.
NEEDED_FREE_BYTES = 12 * 2**30


def pytest_sessionstart(session: pytest.Session) -> None:
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if free < NEEDED_FREE_BYTES and not os.environ.get("OUTLAST_TESTS_IGNORE_DISK"):
        raise pytest.UsageError(
            f"only {free / 2**30:.1f} GiB free under {tempfile.gettempdir()}; the suite needs about "
            f"{NEEDED_FREE_BYTES / 2**30:.0f} GiB for its checkpoints. Free some space (old runs' "
            f"folders are in {tempfile.gettempdir()}/pytest-of-*), or set OUTLAST_TESTS_IGNORE_DISK=1.")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed:
        item.stash[_FAILED] = True
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem):
    path = getattr(item, "funcargs", {}).get("tmp_path")
    try:
        return (yield)
    finally:
        # teardown's own report comes after this hook; a fixture that failed to clean up still
        # leaves the folder only when an earlier phase failed, which is the case worth keeping
        if path is not None and not item.stash.get(_FAILED, False):
            shutil.rmtree(path, ignore_errors=True)


_FAILED = pytest.StashKey[bool]()
