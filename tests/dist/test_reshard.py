"""Save at world size A under mixed layouts, load at world size B under other layouts.

Layouts: plain replicated (DDP), DTensor Shard(0)/Shard(1)/Replicate on a 1-D mesh,
(Replicate, Shard(0)) and (Shard(0), Shard(1)) on a 2x2 mesh, FlatShard with random cut
points, and tensors only some ranks hold (pipeline stages). Shapes (1-3 dims, uneven and
empty shards included) and dtypes are drawn from a fixed seed. Every region is compared
bit-exactly with the global tensor, and outlast.read in one process must rebuild every
tensor whatever world size saved it.
"""


import pytest

from tests.dist.harness import run_job

pytestmark = pytest.mark.slow

WORLDS = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("reshard"))
    out = {}
    for a in WORLDS:
        out[a] = run_job("jobs_matrix", "save", a, root)
    return root, out


def test_saves_balanced(saved):
    _, out = saved
    for a, ranks in out.items():
        assert all(b < 2.5 for b in ranks[0]["balance"]), (a, ranks[0]["balance"])


@pytest.mark.parametrize("b", WORLDS)
def test_load_any_world_size(saved, b):
    root, _ = saved
    res = run_job("jobs_matrix", "load", b, root, ",".join(map(str, WORLDS)))
    bad = [x for r in res for x in r["bad"]]
    assert not bad, bad[:20]
    if b > 1:
        # replicated tensors are read once and sent: somebody received bytes
        assert sum(c[1] for r in res for c in r["counters"]) > 0
