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


@pytest.mark.parametrize("b", [2, 3, 4])
def test_grid_loads_reshard_bit_exactly(saved, b):
    root, _ = saved
    res = run_job("jobs_grid", "load", b, root, ",".join(map(str, SAVE)))
    assert not [x for r in res for x in r["bad"]]
    assert all(all(r["grid_loads"]) and r["grid_loads"] for r in res), [r["grid_loads"] for r in res]
