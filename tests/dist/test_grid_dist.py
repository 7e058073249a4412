"""The grid planners in real jobs: plain tensors, DTensors (1-D and 2x2 meshes, uneven and
empty shards) and pipeline-stage tensors saved at one world size and loaded at another,
bit-exactly, with the per-dimension save and load plans actually taken."""


import pytest

from tests.dist.harness import run_job

pytestmark = pytest.mark.slow

SAVE = [1, 2, 4]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("grid"))
    return root, {a: run_job("jobs_grid", "save", a, root) for a in SAVE}


def test_grid_save_plans_are_taken_and_cached(saved):
    _, out = saved
    for a, ranks in out.items():
        for r in ranks:
            assert set(r["planners"]) == {"GridSavePlan"}, (a, r["planners"])
            assert r["cached"] == [False, True] * (len(r["cached"]) // 2), (a, r["cached"])


def test_saved_manifests_list_sharded_tensors_as_grids(saved):
    """Tensors saved in several chunks are written in the grid form (manifest version 2);
    a tensor stored in one chunk keeps its one record."""
    _, out = saved
    for a, ranks in out.items():
        forms = ranks[0]["forms"]
        grids = sum(v == "grid" for f in forms for v in f["tensors"].values())
        assert all(v == "grid" or v == 1 for f in forms for v in f["tensors"].values()), (a, forms)
        assert all(f["version"] == (2 if "grid" in f["tensors"].values() else 1) for f in forms), (a, forms)
        if a > 1:
            assert grids > 0, (a, forms)


@pytest.mark.parametrize("b", [2, 3, 4])
def test_grid_loads_reshard_bit_exactly(saved, b):
    root, _ = saved
    res = run_job("jobs_grid", "load", b, root, ",".join(map(str, SAVE)))
    assert not [x for r in res for x in r["bad"]]
    assert all(all(r["grid_loads"]) and r["grid_loads"] for r in res), [r["grid_loads"] for r in res]
    # Checkpoints saved by several ranks give their grids in the manifest: the planner
    # detects a grid from chunk boxes only for one-chunk tensors.
    assert all(n <= 1 for r in res for n in r["detected_chunks"]), [r["detected_chunks"] for r in res]
