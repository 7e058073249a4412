"""Jobs for the grid path: the layout matrix without FlatShard (plain tensors, DTensors
on 1-D and 2x2 meshes, pipeline-stage tensors), saved at A and loaded at B.

Each rank reports which planner its save used and whether its load took the per-dimension
grid plan, so the test fails if the fast path silently stopped being taken.
Run by tests/dist/test_grid_dist.py through harness.run_job.
"""

from __future__ import annotations

import json
import os
import sys

import outlast
from outlast import grid
from tests.dist import jobs_matrix as jm
from tests.dist.harness import spawn


def _no_flat(world: int, ndim: int) -> list[str]:
    return [x for x in _layouts(world, ndim) if x != "flat"]


_layouts = jm.layouts_for
jm.layouts_for = _no_flat


def save_job(rank: int, world: int, root: str) -> dict:
    meshes = jm.Meshes(world)
    out = {"planners": [], "cached": [], "forms": []}
    for case in range(jm.N_CASES):
        state, _ = jm.build_state(case, rank, world, meshes, salt=world, fill=True)
        path = os.path.join(root, f"w{world}", f"case{case}")
        for again in (False, True):  # the second save of an unchanged layout hits the cache
            prepared = outlast.prepare_save(state)
            outlast.persist(prepared, path, step=case, overwrite=again)
            out["planners"].append(type(prepared.plan).__name__)
            out["cached"].append(prepared.plan_cached)
        # How the committed manifest lists each tensor's chunks: grid form, or one record
        # per chunk (and how many chunks those records hold).
        with open(os.path.join(path, "manifest.json")) as f:
            raw = json.load(f)
        out["forms"].append({"version": raw["version"], "tensors": {
            fqn: "grid" if "grid" in t else len(t["chunks"]) for fqn, t in raw["tensors"].items()}})
    return out


def load_job(rank: int, world: int, root: str, saved_worlds: str) -> dict:
    taken = []
    detected = []
    real, real_detect = grid.plan_load_layouts, grid.stored_grid

    def spy(*a, **k):
        plan = real(*a, **k)
        taken.append(plan is not None)
        return plan

    def spy_detect(*a, **k):  # a grid found from chunk boxes, not read from the manifest
        detected.append(len(a[1]))
        return real_detect(*a, **k)

    grid.plan_load_layouts = spy
    grid.stored_grid = spy_detect
    meshes = jm.Meshes(world)
    bad: list[str] = []
    for a in saved_worlds.split(","):
        for case in range(jm.N_CASES):
            state, _ = jm.build_state(case, rank, world, meshes, salt=world * 3 + int(a), fill=False)
            outlast.load(state, os.path.join(root, f"w{a}", f"case{case}"))
            bad += [f"saved at {a}: {b}" for b in jm.check_state(state, case)]
    return {"bad": bad, "grid_loads": taken, "detected_chunks": detected}


if __name__ == "__main__":
    case, world, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    fn = {"save": save_job, "load": load_job}[case]
    spawn(fn, world, out, *sys.argv[4:])
