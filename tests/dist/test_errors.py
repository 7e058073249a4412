"""Bad input in a distributed save or load fails on every rank with a clear error."""


import pytest

from tests.dist.harness import run_job

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_job("jobs_errors", "errors", 2, str(tmp_path_factory.mktemp("errors")))


def test_shape_conflict_names_tensor_and_both_shapes(results):
    for r in results:
        assert r["shape"]["type"] == "DistributedError"
        assert "'w'" in r["shape"]["msg"] and "[3, 4]" in r["shape"]["msg"] and "[3, 5]" in r["shape"]["msg"]


def test_plain_conflict_on_all_ranks(results):
    for r in results:
        assert r["plain"]["type"] == "DistributedError" and "'step'" in r["plain"]["msg"]


def test_serialization_error_reaches_every_rank(results):
    for r in results:
        assert r["serial"]["type"] == "SerializationError" and "'x'" in r["serial"]["msg"]
    assert "rank 1" in results[0]["serial"]["msg"]


def test_disk_full_on_one_rank_fails_all_commits_nothing(results):
    for r in results:
        assert r["disk"]["type"] == "StorageError" and "disk is full" in r["disk"]["msg"]
    assert "rank 1" in results[0]["disk"]["msg"]
    assert not any(n.startswith("disk") or ".disk" in n for n in results[0]["disk_leftovers"])


def test_plain_oserror_on_one_rank_is_storage_error_on_every_rank(results):
    """Fails without the uniform class: rank 1 raised its bare OSError (not an outlast
    error at all) while rank 0 raised DistributedError."""
    for r in results:
        assert r["oserror"]["type"] == "StorageError", r["oserror"]
        assert "rank 1" in r["oserror"]["msg"] and "No space left on device" in r["oserror"]["msg"]
    assert results[1]["oserror"]["cause"] == "OSError"
    assert results[0]["oserror"]["cause"] is None


def test_foreign_error_on_one_rank_is_one_class_everywhere_with_its_cause(results):
    for r in results:
        assert r["runtime"]["type"] == "DistributedError", r["runtime"]
        assert "RuntimeError: state_dict of the data loader failed" in r["runtime"]["msg"]
    assert results[1]["runtime"]["cause"] == "RuntimeError"


def test_live_shape_mismatch_at_load(results):
    for r in results:
        assert r["load_shape"]["type"] == "IncompatibleStateError"
        assert "'w'" in r["load_shape"]["msg"] and "[3, 4]" in r["load_shape"]["msg"] and "[3, 5]" in r["load_shape"]["msg"]


def test_stateful_failing_to_load_on_one_rank_fails_every_rank(results):
    """Fails without the exchange after the load's last step: rank 0 returned as if loaded."""
    for r in results:
        assert r["load_stateful"]["type"] == "DistributedError", r["load_stateful"]
        assert "rank 1" in r["load_stateful"]["msg"] and "past the end" in r["load_stateful"]["msg"]
    assert results[1]["load_stateful"]["cause"] == "ValueError"


def test_a_distributed_load_checks_each_data_file_header_on_one_rank(results):
    """Fails when every rank opens every shard header (N ranks x F files of small reads)."""
    files = results[0]["data_files"]
    assert len(files) == 2
    opened = [name for r in results for name in r["headers_opened"]]
    assert sorted(opened) == files


def test_missing_writer_file_names_lost_regions(results):
    for r in results:
        assert r["missing_file"]["type"] == "CorruptCheckpointError", r["missing_file"]
        assert "w00001.safetensors" in r["missing_file"]["msg"]


def test_plan_cache(results):
    for r in results:
        # the first layout was already planned by the disk-full save above: a hit
        assert r["cache"] == [True, True, False]
    assert results[0]["cached_ok"]
