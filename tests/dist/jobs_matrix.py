"""Jobs for the layout matrix: save at world size A under mixed layouts, load at B.

Run by tests/dist/test_reshard.py through harness.run_job. Every tensor's global value
is a function of its name only, so any rank in any job can check any region bit-exactly.
"""

from __future__ import annotations

import os
import random
import sys
import zlib

import torch

import outlast
from outlast.layouts import local_tensor
from outlast.regions import Box
from tests.dist.harness import spawn

DTYPES = [torch.float32, torch.bfloat16, torch.float64, torch.int32, torch.float16]
N_CASES = 2
STAGE = {"t0", "t5"}


def specs(case: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    rng = random.Random(1000 + case)
    out = []
    for i in range(10):
        nd = rng.choice([1, 2, 2, 2, 3])
        shape = tuple(rng.randint(1, 13) for _ in range(nd))
        out.append((f"t{i}", shape, rng.choice(DTYPES)))
    out.append(("big", (rng.randint(40, 90), 33), torch.float32))
    return out


def global_value(name: str, shape, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return torch.randint(-1000, 1000, shape, generator=g, dtype=torch.int64).to(dtype)


def layouts_for(world: int, ndim: int) -> list[str]:
    ls = ["plain", "dt_s0", "dt_rep", "flat"]
    if ndim >= 2:
        ls.append("dt_s1")
    if world == 4:
        ls.append("2d_rep_s0")
        if ndim >= 2:
            ls.append("2d_s0_s1")
    return ls


class Meshes:
    def __init__(self, world: int):
        from torch.distributed.device_mesh import init_device_mesh

        self.m1 = init_device_mesh("cpu", (world,))
        self.m2 = init_device_mesh("cpu", (2, 2)) if world == 4 else None


def holders(world: int) -> set[int]:
    return {world - 1} | ({0} if world > 2 else set())


def make_leaf(layout: str, g: torch.Tensor, rank: int, world: int, meshes: Meshes, salt: str, fill: bool):
    """The live leaf of ``g`` under ``layout``; zeros instead of data when not ``fill``."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    src = g if fill else torch.zeros_like(g)
    if layout == "plain" or layout == "some":
        return src.clone()
    if layout == "flat":
        n = g.numel()
        rng = random.Random(salt)
        cuts = sorted([0, n] + [rng.randint(0, n) for _ in range(world - 1)])
        a, b = cuts[rank], cuts[rank + 1]
        return outlast.FlatShard(src.reshape(-1)[a:b].clone(), tuple(g.shape), a)
    placements = {
        "dt_s0": (meshes.m1, [Shard(0)]),
        "dt_s1": (meshes.m1, [Shard(1)]),
        "dt_rep": (meshes.m1, [Replicate()]),
        "2d_rep_s0": (meshes.m2, [Replicate(), Shard(0)]),
        "2d_s0_s1": (meshes.m2, [Shard(0), Shard(1)]),
    }[layout]
    return distribute_tensor(src.clone(), placements[0], placements[1], src_data_rank=None)


def build_state(case: int, rank: int, world: int, meshes: Meshes, salt: int, fill: bool) -> tuple[dict, dict]:
    state: dict = {"t": {}, "meta": {"case": case, "note": "plain values ride along"}}
    chosen = {}
    for i, (name, shape, dtype) in enumerate(specs(case)):
        ls = layouts_for(world, len(shape))
        # t0 and t5 are pipeline-stage tensors: only some ranks hold them, on save and load.
        layout = "some" if name in STAGE else ls[(i * 7 + salt) % len(ls)]
        chosen[name] = layout
        g = global_value(name, shape, dtype)
        leaf = make_leaf(layout, g, rank, world, meshes, f"{case}-{name}-{world}-{salt}", fill)
        if layout == "some":
            if rank in holders(world):
                state[f"stage_{name}"] = {name: leaf}
        else:
            state["t"][name] = leaf
    return state, chosen


def check_state(state: dict, case: int) -> list[str]:
    bad = []
    spec = {n: (s, d) for n, s, d in specs(case)}
    leaves = dict(state["t"])
    for k, v in state.items():
        if k.startswith("stage_"):
            leaves.update(v)
    for name, leaf in leaves.items():
        shape, dtype = spec[name]
        g = global_value(name, shape, dtype)
        lt = local_tensor(name, leaf)
        for r in lt.regions:
            if not torch.equal(r.data.cpu(), g[r.box.relative_to(Box.full(shape))]):
                bad.append(f"case {case} {name} {type(leaf).__name__} box {r.box}")
    return bad


def save_job(rank: int, world: int, root: str) -> dict:
    meshes = Meshes(world)
    out = {"chosen": [], "balance": []}
    for case in range(N_CASES):
        state, chosen = build_state(case, rank, world, meshes, salt=world, fill=True)
        prepared = outlast.prepare_save(state, min_split_bytes=256)
        outlast.persist(prepared, os.path.join(root, f"w{world}", f"case{case}"), step=case)
        out["chosen"].append(chosen)
        out["balance"].append(prepared.report.balance)
    return out


def load_job(rank: int, world: int, root: str, saved_worlds: str) -> dict:
    meshes = Meshes(world)
    bad: list[str] = []
    counters = []
    for a in saved_worlds.split(","):
        for case in range(N_CASES):
            path = os.path.join(root, f"w{a}", f"case{case}")
            state, _ = build_state(case, rank, world, meshes, salt=world * 3 + int(a), fill=False)
            rep = outlast.load(state, path)
            bad += [f"saved at {a}: {b}" for b in check_state(state, case)]
            counters.append([rep.bytes_read, rep.bytes_received, rep.bytes_sent])
            if state["meta"] != {"case": case, "note": "plain values ride along"}:
                bad.append(f"plain meta wrong: {state['meta']}")
            if rank == 0:
                full = outlast.read(path)
                for name, shape, dtype in specs(case):
                    got = full["t"].get(name)
                    if got is None:
                        got = full[f"stage_{name}"][name]
                    if not torch.equal(got, global_value(name, shape, dtype)):
                        bad.append(f"read() of {path} {name} differs")
    return {"bad": bad, "counters": counters}


if __name__ == "__main__":
    case, world, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    fn = {"save": save_job, "load": load_job}[case]
    spawn(fn, world, out, *sys.argv[4:])
