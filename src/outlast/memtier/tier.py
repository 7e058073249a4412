"""The memory tier: snapshots in shared memory, a copy or XOR parity on other nodes, recovery.

:class:`MemoryTier` is what a :class:`~outlast.Checkpointer` built with ``memory_every``
uses. Its :meth:`~MemoryTier.persist` runs on the Checkpointer's persist thread with a
job the async saver has already staged: the staging buffers *are* the shard files'
bytes, so the snapshot is written from them (and sent to other nodes from them) with no
second copy of the state. :meth:`~MemoryTier.prepare_restore` finds, across every live
node's shared memory, the newest step that is complete or rebuildable, moves and
rebuilds the missing files so each node holds the whole step, and hands back a folder
the ordinary (resharding) :func:`outlast.load` reads. Every collective runs on the
tier's own gloo group, under the job's process-group timeout.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass

import torch
import xxhash

from ..collective import Group, raise_gathered
from ..errors import CheckpointError, CorruptCheckpointError
from ..format import MANIFEST_NAME, Chunk, Manifest
from ..regions import Box
from ..saving import _same_plain, build_manifest
from ..shards import write_images, write_items
from . import parity as xor
from . import store
from .topology import (
    REDUNDANCY, RecoveryPlan, group_of, leaders, mirror_of, node_of, num_nodes, padded_length,
    parity_groups, plan_recovery,
)

log = logging.getLogger("outlast")

_MESSAGE = 64 << 20  # bytes per point-to-point message


@dataclass(frozen=True)
class MemoryConfig:
    """How a Checkpointer keeps snapshots in shared memory.

    Args:
        every: snapshot every this many steps (``Checkpointer.maybe_snapshot``).
        redundancy: ``"mirror"`` (a full copy of each rank's shard on the same place of
            the next node) or ``"parity"`` (XOR parity across ``parity_group`` ranks on
            distinct nodes; each holds 1/(n-1) of a shard; any one member is rebuilt).
        ranks_per_node: ranks sharing one failure domain (a machine's ``/dev/shm``);
            default ``LOCAL_WORLD_SIZE`` from torchrun, else all ranks (one node).
        parity_group: ranks per parity group (default: every node, at most 8).
        job_id: names the job's shared-memory folder; default ``TORCHELASTIC_RUN_ID``
            (the same across torchrun restarts). Pass one to restore in a new launch.
        shm_dir: the tmpfs holding the snapshots.
        keep: complete snapshots kept (the newest ``keep``; at least 2, so a snapshot
            torn by a crash always leaves a complete one).
    """

    every: int
    redundancy: str = "mirror"
    ranks_per_node: int | None = None
    parity_group: int | None = None
    job_id: str | None = None
    shm_dir: str = store.DEFAULT_ROOT
    keep: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise ValueError(f"memory_every must be an integer >= 1, got {self.every!r}")
        if self.redundancy not in REDUNDANCY:
            raise ValueError(f"redundancy must be one of {REDUNDANCY}, got {self.redundancy!r}")
        if self.ranks_per_node is not None and (not isinstance(self.ranks_per_node, int) or self.ranks_per_node < 1):
            raise ValueError(f"ranks_per_node must be an integer >= 1, got {self.ranks_per_node!r}")
        if self.parity_group is not None and (not isinstance(self.parity_group, int) or self.parity_group < 2):
            raise ValueError(f"parity_group must be an integer >= 2, got {self.parity_group!r}")
        if self.job_id is not None and (not self.job_id or "/" in self.job_id or self.job_id.startswith(".")):
            raise ValueError(f"job_id must be a plain name (no '/'), got {self.job_id!r}")
        if not isinstance(self.keep, int) or self.keep < 2:
            raise ValueError(f"memory_keep must be an integer >= 2, got {self.keep!r}")


def _fault(e: BaseException | None):
    return None if e is None else (type(e).__name__, str(e))


class MemoryTier:
    """One rank's part of the memory tier (see the module docstring).

    Collective: every rank builds one, and calls :meth:`persist`, :meth:`prepare_restore`,
    :meth:`finish_restore` and :meth:`close` at the same points.
    """

    def __init__(self, config: MemoryConfig, *, rank: int, world_size: int, directory: str, pg=None) -> None:
        self.config = config
        self.rank, self.world_size = rank, world_size
        R = config.ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        self.ranks_per_node = max(1, min(R, world_size))
        self.nodes = num_nodes(world_size, self.ranks_per_node)
        job = config.job_id or os.environ.get("TORCHELASTIC_RUN_ID")
        if not job or job == "none":
            raise ValueError(
                "the memory tier needs a job id that survives a restart: run under torchrun "
                "(TORCHELASTIC_RUN_ID) or pass memory_job_id='<name>'"
            )
        self.job_id = job
        self.node = node_of(rank, self.ranks_per_node)
        self.node_path = store.node_dir(config.shm_dir, job, self.node)
        self.is_leader = rank % self.ranks_per_node == 0
        self.redundancy = config.redundancy
        if self.nodes < 2:
            log.warning("outlast: memory tier on one node (%d rank(s)): snapshots survive a killed "
                        "process, not the loss of the node", world_size)
        self.groups: list[list[int]] = []
        if self.redundancy == "parity" and self.nodes >= 2:
            n = config.parity_group or min(self.nodes, 8)
            if self.nodes % n:
                raise ValueError(f"parity_group={n} must divide the number of nodes ({self.nodes} = "
                                 f"{world_size} ranks / {self.ranks_per_node} per node)")
            self.groups = parity_groups(world_size, self.ranks_per_node, n)
        self._g = Group(pg, rank, world_size) if pg is not None else None
        self.complete: list[int] = []  # steps complete on every rank, oldest first
        self.timings: dict = {}  # of the last prepare_restore
        os.makedirs(self.node_path, exist_ok=True)
        self._alive = store.register_alive(config.shm_dir, job, {
            "job_id": job, "directory": directory, "redundancy": self.redundancy,
            "ranks_per_node": self.ranks_per_node, "world_size": world_size, "host": socket.gethostname()})

    # ------------------------------------------------------------------ helpers
    def _together(self, err: BaseException | None, what: str) -> None:
        if self._g is not None:
            self._g.raise_together(err, what)
        elif err is not None:
            raise err

    def _gather(self, obj, what: str) -> list:
        return self._g.all_gather(obj, what) if self._g is not None else [obj]

    def _timeout(self) -> datetime.timedelta | None:
        from ..collective import group_timeout

        return group_timeout(self._g.pg) if self._g is not None else None

    def _wait(self, works: list) -> None:
        t = self._timeout()
        for w in works:
            if t is not None:
                w.wait(t)
            else:
                w.wait()

    def _send(self, t: torch.Tensor, dst: int, tag: int) -> list:
        return [self._g.isend(t[a : a + _MESSAGE], dst, tag * 4096 + k) for k, a in enumerate(range(0, t.numel(), _MESSAGE))]

    def _recv(self, t: torch.Tensor, src: int, tag: int) -> list:
        return [self._g.irecv(t[a : a + _MESSAGE], src, tag * 4096 + k) for k, a in enumerate(range(0, t.numel(), _MESSAGE))]

    def path_of(self, step: int) -> str:
        return store.piece_path(self.node_path, step, store.piece_name(self.rank))

    # ------------------------------------------------------------------ snapshot
    def persist(self, job) -> None:
        """Write ``job``'s staged shard files as this rank's piece of snapshot ``job.step``,
        then its mirror or parity on other nodes; on success on every rank, the step is
        complete and older snapshots beyond ``keep`` are freed. Collective."""
        step = job.step
        what = f"memory snapshot of step {step} in {self.node_path}"
        self._together(job.stage_error, f"staging step {step}")
        prepared = job.prepared
        err = None
        tmp = None
        chunks: dict = {}
        files: dict = {}
        try:
            tmp = store.new_piece(self.node_path, step, store.piece_name(self.rank))
            if prepared.images is not None:
                chunks, files = write_images(tmp, prepared.items, prepared.images)
            else:
                chunks, files = write_items(tmp, prepared.items, prepared.writer_of)
        except OSError as e:
            err = store.shm_error(what, tmp or self.node_path, e)
        except Exception as e:  # noqa: BLE001 - to every rank
            err = e
        payload = (_fault(err), {k: [c.to_json() for c in v] for k, v in chunks.items()}, files,
                   {fqn: (p.path, p.value) for fqn, p in prepared.plain.items()})
        gathered = self._gather(payload, what)
        try:
            raise_gathered(err, [g[0] for g in gathered], what)
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        sizes = [g[2] for g in gathered]  # every rank's files
        manifest = None
        err = None
        if self.rank == 0:
            try:
                all_chunks: dict[str, list[Chunk]] = {}
                all_files: dict[str, int] = {}
                for _, cj, fs, _ in gathered:
                    for fqn, cs in cj.items():
                        all_chunks.setdefault(fqn, []).extend(_chunk(c) for c in cs)
                    all_files.update(fs)
                plan = prepared.plan
                tensors = plan.tensors if plan is not None else _metas(prepared)
                manifest = build_manifest(tensors, _same_plain([g[3] for g in gathered], what), all_chunks, all_files,
                                          step=step, world_size=self.world_size,
                                          extra={"memory_snapshot": {"job_id": self.job_id}}).dumps()
            except Exception as e:  # noqa: BLE001
                err = e
        if self._g is not None:
            got = self._g.broadcast((_fault(err), manifest), what)
            raise_gathered(err, [got[0]] + [None] * (self.world_size - 1), what)
            manifest = got[1]
        elif err is not None:
            raise err
        err = None
        try:
            store.write_piece_meta(tmp, manifest, {"rank": self.rank, "world_size": self.world_size,
                                                   "files": files, "step": step})
            final = store.commit_piece(tmp, store.piece_name(self.rank))
            own = self._own_bytes(prepared, final, files)
            if self.nodes >= 2 and self._g is not None:
                if self.redundancy == "mirror":
                    self._mirror(step, manifest, own, sizes)
                else:
                    self._parity(step, manifest, own, sizes)
        except OSError as e:
            err = store.shm_error(what, self.node_path, e)
        except Exception as e:  # noqa: BLE001
            err = e
        self._together(err, what)
        self.complete = [s for s in self.complete if s != step] + [step]
        self._retain()

    def _own_bytes(self, prepared, piece: str, files: dict[str, int]) -> dict[str, torch.Tensor]:
        """This rank's file bytes: the staging images themselves when the save had them."""
        if prepared.images is not None:
            return {lay.rel: img[: lay.size] for lay, img in prepared.images}
        return {rel: torch.frombuffer(bytearray(store.read_bytes(os.path.join(piece, rel))), dtype=torch.uint8)
                for rel in files}

    def _mirror(self, step: int, manifest: bytes, own: dict[str, torch.Tensor], sizes: list[dict]) -> None:
        R, W = self.ranks_per_node, self.world_size
        dst = mirror_of(self.rank, W, R)
        src = next(q for q in range(W) if mirror_of(q, W, R) == self.rank)
        theirs = {rel: torch.empty(n, dtype=torch.uint8) for rel, n in sorted(sizes[src].items())}
        works = []
        for i, (rel, t) in enumerate(theirs.items()):
            works += self._recv(t, src, i)
        sends = []
        for i, rel in enumerate(sorted(own)):
            sends += self._send(own[rel], dst, i)
        self._wait(works)
        tmp = store.new_piece(self.node_path, step, store.piece_name(src))
        for rel, t in theirs.items():
            with open(os.path.join(tmp, rel), "wb") as f:
                f.write(memoryview(t.numpy()))
        store.write_piece_meta(tmp, manifest, {"rank": src, "world_size": W, "files": sizes[src], "step": step})
        self._wait(sends)
        store.commit_piece(tmp, store.piece_name(src))

    def _parity(self, step: int, manifest: bytes, own: dict[str, torch.Tensor], sizes: list[dict]) -> None:
        members = group_of(self.rank, self.groups)
        L, s = padded_length([sum(sizes[q].values()) for q in members], len(members))
        data = xor.pad([own[rel] for rel in sorted(own)], L)
        peers = [q for q in members if q != self.rank]
        inbox = {q: torch.empty(s, dtype=torch.uint8) for q in peers}
        works = []
        for q in peers:
            works += self._recv(inbox[q], q, 1)
        sends = []
        for q in peers:
            sends += self._send(xor.segment(data, members, self.rank, q, s), q, 1)
        self._wait(works)
        block = torch.zeros(s, dtype=torch.uint8)
        for q in peers:
            xor.xor_into(block, inbox[q])
        tmp = store.new_piece(self.node_path, step, store.parity_name(self.rank))
        with open(os.path.join(tmp, store.BLOCK), "wb") as f:
            f.write(memoryview(block.numpy()))
        store.write_piece_meta(tmp, manifest, {
            "holder": self.rank, "members": members, "L": L, "s": s, "step": step,
            "sizes": {str(q): dict(sorted(sizes[q].items())) for q in members}}, store.PARITY)
        self._wait(sends)
        store.commit_piece(tmp, store.parity_name(self.rank))

    def _retain(self) -> None:
        """The node's first rank frees snapshots older than the newest ``keep`` complete ones
        (and nothing newer than the newest complete one: it may be being written)."""
        keep = set(self.complete[-self.config.keep :])
        self.complete = self.complete[-self.config.keep :]
        if not self.is_leader or not self.complete:
            return
        newest = self.complete[-1]
        old = [s for s in store.steps_present(self.node_path) if s < newest and s not in keep]
        store.remove_steps(self.node_path, old)

    # ------------------------------------------------------------------ restore
    def prepare_restore(self) -> tuple[RecoveryPlan | None, str | None, list[str]]:
        """Find the newest recoverable step and assemble it on every live node. Collective.

        Returns ``(plan, folder, reasons)``: the folder (in this node's shared memory)
        holds the whole step as a checkpoint, ready for :func:`outlast.load`, every byte
        of it already checked against the manifest's checksums (local copies before the
        plan, received and rebuilt files once written); or
        ``(None, None, reasons)`` when memory cannot supply any step, saying why.
        """
        what = f"finding a memory snapshot of job {self.job_id}"
        t0 = time.perf_counter()
        inv, err = None, None
        R = self.ranks_per_node
        try:
            if self.is_leader:
                store.remove_temp(self.node_path)
            # The node's ranks verify its pieces in parallel, each every R-th one.
            inv = store.inventory(self.node_path, share=(self.rank % R, R))
        except Exception as e:  # noqa: BLE001
            err = e
        got = self._gather((_fault(err), inv), what)
        raise_gathered(err, [g[0] for g in got], what)
        nodes = leaders(self.world_size, R)
        inventories = {n: store.merge([got[q][1] for q in range(self.world_size) if node_of(q, R) == n])
                       for n in nodes}
        plan = plan_recovery(inventories)
        t1 = time.perf_counter()
        if not isinstance(plan, RecoveryPlan):
            return None, None, plan or ["no memory snapshot of this job exists"]
        folder = os.path.join(self.node_path, f"restore-{plan.step:08d}")
        err = None
        try:
            if self.is_leader:  # only node leaders move bytes
                self._assemble(plan, folder, nodes)
        except OSError as e:
            err = store.shm_error(f"rebuilding memory snapshot step {plan.step}", folder, e)
        except Exception as e:  # noqa: BLE001
            err = e
        got = self._gather(_fault(err), what)
        bad = [(r, o) for r, o in enumerate(got) if o is not None]
        if bad:
            r, (name, msg) = bad[0]
            return None, None, plan.skipped + [f"step {plan.step}: rebuilding it failed on rank {r}: {name}: {msg}"]
        self.timings = {"inventory_s": t1 - t0, "assemble_s": time.perf_counter() - t1}
        log.info("outlast: memory snapshot step %d found and verified in %.3f s, assembled in %.3f s",
                 plan.step, t1 - t0, self.timings["assemble_s"])
        return plan, folder, plan.skipped

    def _assemble(self, plan: RecoveryPlan, folder: str, nodes: dict[int, int]) -> None:
        n = self.node
        step = plan.step
        if os.path.lexists(folder):
            shutil.rmtree(folder)
        os.makedirs(os.path.join(folder, "data"))
        names = sorted(plan.files)
        # Files this node holds: hard links (the same pages; nothing copied).
        for rel, q in plan.local[n].items():
            os.link(os.path.join(store.piece_path(self.node_path, step, store.piece_name(q)), rel), os.path.join(folder, rel))
        manifest = self._manifest_bytes(plan, nodes)
        # Files other nodes need from this one, and files this one needs from others.
        recvs, inbox = [], {}
        for rel, src in plan.fetch[n].items():
            inbox[rel] = torch.empty(plan.files[rel], dtype=torch.uint8)
            recvs += self._recv(inbox[rel], nodes[src], names.index(rel))
        blocks = {}
        for j, src in plan.blocks[n].items():
            if src == n:
                blocks[j] = self._block(step, j)
            else:
                blocks[j] = torch.empty(self._block_size(plan, j), dtype=torch.uint8)
                recvs += self._recv(blocks[j], nodes[src], len(names) + j)
        sends = []
        for m, wants in sorted(plan.fetch.items()):
            for rel, src in wants.items():
                if src == n and m != n:
                    sends += self._send(self._held(plan, rel), nodes[m], names.index(rel))
        for m, wants in sorted(plan.blocks.items()):
            for j, src in wants.items():
                if src == n and m != n:
                    sends += self._send(self._block(step, j), nodes[m], len(names) + j)
        self._wait(recvs)
        m = Manifest.loads(manifest, os.path.join(folder, MANIFEST_NAME))
        for rel, t in inbox.items():
            with open(os.path.join(folder, rel), "wb") as f:
                f.write(memoryview(t.numpy()))
            # Verified where it lies now, like every local copy was before the plan.
            why = store.file_fault(folder, m, rel)
            if why:
                raise CorruptCheckpointError(f"{os.path.join(folder, rel)}: received from node {plan.fetch[n][rel]} "
                                             f"but does not verify ({why})", [f"{rel}: {why}"])
        self._wait(sends)
        for k, g in sorted(plan.rebuild.items()):
            self._rebuild(k, g, blocks, folder, manifest)
        with open(os.path.join(folder, MANIFEST_NAME), "wb") as f:
            f.write(manifest)

    def _held(self, plan: RecoveryPlan, rel: str) -> torch.Tensor:
        q = plan.local[self.node][rel]
        data = store.read_bytes(os.path.join(store.piece_path(self.node_path, plan.step, store.piece_name(q)), rel))
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def _block(self, step: int, j: int) -> torch.Tensor:
        data = store.read_bytes(os.path.join(store.piece_path(self.node_path, step, store.parity_name(j)), store.BLOCK))
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    @staticmethod
    def _block_size(plan: RecoveryPlan, j: int) -> int:
        return next(g["s"] for g in plan.rebuild.values() if j in g["members"])

    def _manifest_bytes(self, plan: RecoveryPlan, nodes: dict[int, int]) -> bytes:
        """The step's manifest: from a local piece, else from the first node that has one."""
        mine = None
        sd = os.path.join(self.node_path, store.step_name(plan.step))
        for name in sorted(os.listdir(sd)) if os.path.isdir(sd) else []:
            p = os.path.join(sd, name, MANIFEST_NAME)
            if name.startswith(".") or not os.path.exists(p):
                continue
            data = store.read_bytes(p)
            if xxhash.xxh3_64_hexdigest(data) == plan.digest:
                mine = data
                break
        # Leaders only: sizes, then bytes, from the lowest node holding it to those lacking it.
        return self._share_manifest(mine, nodes)

    def _share_manifest(self, mine: bytes | None, nodes: dict[int, int]) -> bytes:
        have = torch.tensor([len(mine) if mine is not None else 0], dtype=torch.int64)
        lens = {}
        works = []
        for m, r in nodes.items():
            if r != self.rank:
                lens[m] = torch.zeros(1, dtype=torch.int64)
                works += [self._g.irecv(lens[m], r, 1 << 30)]
                works += [self._g.isend(have, r, 1 << 30)]
        self._wait(works)
        lens[self.node] = have
        src = min(m for m, t in lens.items() if int(t) > 0)
        size = int(lens[src])
        if mine is not None:
            buf = torch.frombuffer(bytearray(mine), dtype=torch.uint8)
            sends = [self._g.isend(buf, r, (1 << 30) + 1) for m, r in nodes.items()
                     if src == self.node and r != self.rank and int(lens[m]) == 0]
            self._wait(sends)
            return mine
        buf = torch.empty(size, dtype=torch.uint8)
        self._wait([self._g.irecv(buf, nodes[src], (1 << 30) + 1)])
        return bytes(buf.numpy())

    def _rebuild(self, k: int, g: dict, blocks: dict[int, torch.Tensor], folder: str, manifest: bytes) -> None:
        members, L, s = g["members"], g["L"], g["s"]
        datas = {}
        for q in members:
            if q == k:
                continue
            # Member q's files: which ones, from the parity record of any block.
            fs = g["sizes"][q]
            datas[q] = xor.pad([torch.frombuffer(bytearray(store.read_bytes(os.path.join(folder, rel))), dtype=torch.uint8)
                                for rel in sorted(fs)], L)
        data = xor.rebuild(k, members, blocks, datas, L, s)
        at = 0
        m = Manifest.loads(manifest, os.path.join(folder, MANIFEST_NAME))
        for rel, size in sorted(g["files"].items()):
            with open(os.path.join(folder, rel), "wb") as f:
                f.write(memoryview(data[at : at + size].numpy()))
            at += size
            why = store.file_fault(folder, m, rel)
            if why:
                raise CheckpointError(f"rank {k}'s shard {rel} rebuilt from parity does not verify ({why})")
        log.info("outlast: rebuilt rank %d's shard (%s) from the parity of ranks %s", k, ", ".join(sorted(g["files"])),
                 [q for q in members if q != k])

    def finish_restore(self, plan: RecoveryPlan, folder: str, loaded: bool) -> None:
        """Remove the assembled folder; after a successful load, also every snapshot newer
        than the restored step (torn or from a run that went further before failing)."""
        if self._g is not None:
            self._g.raise_together(None, "finishing a restore from memory")
        if self.is_leader:
            shutil.rmtree(folder, ignore_errors=True)
            if loaded:
                store.remove_steps(self.node_path, [s for s in store.steps_present(self.node_path) if s > plan.step])
        if loaded:
            self.complete = [plan.step]

    def discard_after(self, step: int | None) -> None:
        """After a restore from disk: drop every snapshot newer than ``step`` (all of them
        for None). They belong to a timeline training is about to redo, and their pieces
        must not mix with the new ones. Collective (a barrier after the removal)."""
        if self.is_leader:
            newest = -1 if step is None else step
            store.remove_steps(self.node_path, [s for s in store.steps_present(self.node_path) if s > newest])
        self.complete = [s for s in self.complete if step is not None and s <= step]
        if self._g is not None:
            self._g.raise_together(None, "dropping memory snapshots newer than the restored step")

    # ------------------------------------------------------------------ lifecycle
    def close(self, free: bool = True) -> None:
        """End of the job: free this job's shared memory (collective)."""
        if self._g is not None:
            self._g.raise_together(None, "closing the memory tier")
        try:
            os.unlink(self._alive)
        except OSError:
            pass
        if not free:
            return
        if self.is_leader:
            shutil.rmtree(self.node_path, ignore_errors=True)
        if self._g is not None:
            self._g.raise_together(None, "closing the memory tier")
        if self.rank == 0:
            jd = store.job_dir(self.config.shm_dir, self.job_id)
            if not store.job_alive(jd):
                shutil.rmtree(jd, ignore_errors=True)
        if self._g is not None:  # every rank returns once the memory is freed
            self._g.raise_together(None, "closing the memory tier")


def load_local(state: dict, folder: str) -> None:
    """Load the assembled step into this rank's ``state`` from this node's copy, with no
    exchange between ranks: every node holds the whole step, so each rank reads exactly
    its own regions (resharding included) from shared memory. Strict; checksums were
    checked when the folder was assembled (:meth:`MemoryTier.prepare_restore`)."""
    from ..loading import _finish_load, plan_load
    from ..reader import CheckpointReader
    from ..tree import flatten

    flat = flatten(state)
    with CheckpointReader(folder) as reader:
        requests, report, extras = plan_load(flat, reader.manifest, folder, True)
        reader.read_regions(requests, verify=False)
        _finish_load(flat, reader.manifest, reader, extras, report, False)


def _chunk(c: dict) -> Chunk:
    return Chunk(Box(tuple(c["offsets"]), tuple(c["sizes"])), c["file"], c["key"], c["offset"], c["nbytes"],
                 c["checksum"], c.get("block_rows", 0), tuple(c.get("block_checksums", ())))


def _metas(prepared):
    from ..saving import _tensor_metas

    return _tensor_metas(prepared)


__all__ = ["MemoryConfig", "MemoryTier"]
