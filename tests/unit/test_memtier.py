"""The memory tier's pure parts: placement, XOR parity, recovery planning, shm store.

The multi-process behaviour (snapshots, kills, rebuilds under torchrun) is in
tests/dist/test_memtier.py.
"""

from __future__ import annotations

import os

import pytest
import torch

import outlast
from outlast.loading import manifest_of
from outlast.memtier import MemoryConfig, parity, store
from outlast.memtier.topology import (
    RecoveryPlan, mirror_of, node_of, padded_length, parity_groups, plan_recovery, segment_index,
)


def test_mirror_lands_on_another_node():
    for world, R in [(4, 2), (8, 2), (6, 3), (4, 1), (8, 4)]:
        for r in range(world):
            m = mirror_of(r, world, R)
            assert node_of(m, R) != node_of(r, R)
        # every rank holds exactly one mirror
        assert sorted(mirror_of(r, world, R) for r in range(world)) == list(range(world))


def test_parity_groups_span_distinct_nodes():
    groups = parity_groups(8, 2, 4)
    assert groups == [[0, 2, 4, 6], [1, 3, 5, 7]]
    for g in parity_groups(12, 2, 3):
        assert len({node_of(r, 2) for r in g}) == len(g) == 3
    assert sorted(r for g in parity_groups(12, 2, 3) for r in g) == list(range(12))


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_parity_rebuilds_any_one_member(n):
    g = torch.Generator().manual_seed(n)
    members = list(range(10, 10 + n))
    sizes = [int(torch.randint(1, 5000, (1,), generator=g)) for _ in members]
    L, s = padded_length(sizes, n)
    assert L == s * (n - 1) and s % 8 == 0 and L >= max(sizes)
    raw = {m: torch.randint(0, 256, (sz,), dtype=torch.uint8, generator=g) for m, sz in zip(members, sizes)}
    datas = {m: parity.pad([raw[m]], L) for m in members}
    blocks = {j: parity.encode(datas, members, j, s) for j in members}
    # each holder stores 1/(n-1) of the padded shard: parity's memory is a mirror's / (n-1)
    assert all(b.numel() * (n - 1) == L for b in blocks.values())
    for lost in members:
        survivors = {m: d for m, d in datas.items() if m != lost}
        got = parity.rebuild(lost, members, {j: b for j, b in blocks.items() if j != lost}, survivors, L, s)
        assert torch.equal(got[: raw[lost].numel()], raw[lost])


def test_segment_index_is_a_bijection_per_owner():
    members = [3, 7, 9, 11]
    for owner in members:
        idx = sorted(segment_index(members, owner, h) for h in members if h != owner)
        assert idx == [0, 1, 2]


# ---------------------------------------------------------------------- planning


def _piece(files, bad=None, digest="d1"):
    return {"files": files, "bad": bad or {}, "digest": digest}


def _step(pieces, parity_=None, files=None, digest="d1", world=4):
    files = files or {f"data/w{r:05d}.safetensors": 100 for r in range(world)}
    return {"manifests": {digest: (files, world)}, "pieces": pieces, "parity": parity_ or {}}


def _f(r):
    return {f"data/w{r:05d}.safetensors": 100}


def test_plan_mirror_full_node_loss():
    # node 0 holds ranks 0,1 (own) and 2,3 (mirrors); node 1 lost everything
    inv = {0: {6: _step({q: _piece(_f(q)) for q in range(4)})}, 1: {}}
    plan = plan_recovery(inv)
    assert isinstance(plan, RecoveryPlan) and plan.step == 6
    assert plan.fetch[0] == {}
    assert set(plan.fetch[1]) == {f"data/w{r:05d}.safetensors" for r in range(4)}
    assert set(plan.fetch[1].values()) == {0}


def test_plan_torn_newest_step_falls_back_to_previous():
    full = {q: _piece(_f(q)) for q in range(4)}
    torn = {q: _piece(_f(q), digest="d2") for q in (0, 1, 3)}  # rank 2 died before its rename
    inv = {0: {6: _step(full), 7: _step(torn, digest="d2")}, 1: {6: _step(full)}}
    plan = plan_recovery(inv)
    assert plan.step == 6
    assert "step 7" in plan.skipped[0] and "w00002" in plan.skipped[0]


def test_plan_skips_a_damaged_copy_and_uses_the_other():
    bad = {q: _piece(_f(q), bad={"data/w00001.safetensors": "checksum mismatch"} if q == 1 else None) for q in range(2)}
    good = {q: _piece(_f(q)) for q in range(4)}
    inv = {0: {6: _step({**good, **bad})}, 1: {6: _step(good)}}
    plan = plan_recovery(inv)
    assert plan.step == 6
    assert "data/w00001.safetensors" in plan.fetch[0] and plan.fetch[0]["data/w00001.safetensors"] == 1
    assert any("damaged" in b and "w00001" in b for b in plan.bad_copies)


def test_plan_both_copies_lost_says_why():
    pieces = {q: _piece(_f(q)) for q in (0, 2, 3)}
    inv = {0: {6: _step(pieces)}, 1: {6: _step(pieces)}}
    why = plan_recovery(inv)
    assert isinstance(why, list) and "w00001" in why[0] and "no intact copy" in why[0]


def _parity_meta(holder, members, digest="d1"):
    return {"holder": holder, "members": members, "sizes": {q: _f(q) for q in members}, "L": 104, "s": 104 // (len(members) - 1) // 8 * 8 or 8,
            "digest": digest}


def test_plan_parity_rebuilds_one_lost_member_and_refuses_two():
    members = [0, 1, 2, 3]
    def node(r, lost=()):
        if r in lost:
            return {}
        return {6: _step({r: _piece(_f(r))}, {r: _parity_meta(r, members)})}
    inv = {r: node(r, lost=(2,)) for r in range(4)}
    plan = plan_recovery(inv)
    assert plan.step == 6 and list(plan.rebuild) == [2]
    assert set(plan.blocks[0]) == {0, 1, 3}
    inv = {r: node(r, lost=(1, 2)) for r in range(4)}
    why = plan_recovery(inv)
    assert isinstance(why, list) and "both" in why[0] and "parity" in why[0]


def test_plan_ignores_pieces_of_another_manifest():
    # a stale piece of rank 1 from before a restart (other digest) does not complete step 6
    pieces = {0: _piece(_f(0)), 2: _piece(_f(2)), 3: _piece(_f(3)), 1: _piece(_f(1), digest="old")}
    inv = {0: {6: _step(pieces)}}
    assert isinstance(plan_recovery(inv), list)


# ---------------------------------------------------------------------- config and store


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="memory_every"):
        MemoryConfig(0)
    with pytest.raises(ValueError, match="redundancy"):
        MemoryConfig(1, redundancy="raid6")
    with pytest.raises(ValueError, match="job_id"):
        MemoryConfig(1, job_id="../x")
    with pytest.raises(ValueError, match="ranks_per_node"):
        outlast.Checkpointer("/tmp/never", memory_every=1, ranks_per_node=0)


def test_file_fault_finds_a_flipped_byte(tmp_path):
    path = str(tmp_path / "c")
    outlast.save({"w": torch.arange(1000.0)}, path, num_writers=1)
    m = manifest_of(path)
    rel = next(iter(m.files))
    assert store.file_fault(path, m, rel) is None
    p = os.path.join(path, rel)
    data = bytearray(open(p, "rb").read())
    data[-7] ^= 1
    open(p, "wb").write(bytes(data))
    assert "checksum mismatch" in store.file_fault(path, m, rel)
    os.truncate(p, 100)
    assert "size" in store.file_fault(path, m, rel)


def test_clean_removes_only_dead_jobs(tmp_path):
    root = str(tmp_path)
    store.register_alive(root, "live", {"job_id": "live"})  # this process: alive
    dead = store.job_dir(root, "dead")
    os.makedirs(os.path.join(dead, "alive"))
    open(os.path.join(dead, "alive", "999999999"), "w").write("1")  # no such process
    os.makedirs(os.path.join(dead, "node-0000", "step-00000003", "rank-00000"))
    jobs = {j["job_id"]: j for j in store.list_jobs(root)}
    assert jobs["live"]["alive"] and not jobs["dead"]["alive"]
    assert jobs["dead"]["steps"] == {3: ["node-0000/rank-00000"]}
    assert store.clean_dead(root) == [dead]
    assert not os.path.exists(dead) and os.path.exists(store.job_dir(root, "live"))


def test_single_process_snapshot_and_restore(tmp_path):
    """One process (one node, no redundancy): a snapshot in shm restores after the
    Checkpointer (the process) is gone, with no disk checkpoint at all."""
    shm = str(tmp_path / "shm")
    state = {"w": torch.arange(10.0), "pos": {"i": 3}}
    ckpt = outlast.Checkpointer(str(tmp_path / "disk"), memory_every=2, memory_job_id="one", shm_dir=shm)
    assert ckpt.maybe_snapshot(state, 1) is False
    assert ckpt.maybe_snapshot(state, 2) is True
    ckpt.wait()
    state["w"].add_(1)
    state["pos"]["i"] = 5
    assert ckpt.maybe_snapshot(state, 4)
    ckpt.wait()
    ckpt._saver.close()  # a crash: no close(), shm stays
    ckpt._saver.remove_hooks()
    fresh = {"w": torch.zeros(10), "pos": {"i": 0}}
    again = outlast.Checkpointer(str(tmp_path / "disk"), memory_every=2, memory_job_id="one", shm_dir=shm)
    assert again.restore(fresh) == 4
    assert again.last_restore["source"] == "memory"
    assert torch.equal(fresh["w"], torch.arange(10.0) + 1) and fresh["pos"]["i"] == 5
    again.close()
    assert not os.path.exists(store.job_dir(shm, "one"))  # freed at a clean end


def test_cli_ls_shows_memory_snapshots_and_shm_clean_removes_dead_jobs(tmp_path):
    from click.testing import CliRunner

    from outlast.cli import main

    shm = str(tmp_path / "shm")
    disk = str(tmp_path / "disk")
    state = {"w": torch.arange(10.0)}
    ckpt = outlast.Checkpointer(disk, memory_every=1, memory_job_id="cli", shm_dir=shm)
    ckpt.maybe_snapshot(state, 3)
    ckpt.wait()
    out = CliRunner().invoke(main, ["ls", disk, "--shm-dir", shm])
    assert out.exit_code == 0 and "memory snapshots of job cli" in out.output and "step        3" in out.output
    out = CliRunner().invoke(main, ["shm", "clean", "--shm-dir", shm])
    assert "removed 0 dead job(s)" in out.output  # this process is alive
    ckpt._saver.close()  # the "process" dies without close(): leftovers
    os.unlink(ckpt._memory._alive)
    out = CliRunner().invoke(main, ["shm", "clean", "--shm-dir", shm])
    assert "removed 1 dead job(s)" in out.output and not os.path.exists(store.job_dir(shm, "cli"))
