"""The memory tier's files in shared memory: one job's directory, its nodes, steps and pieces.

```
/dev/shm/outlast-<job>/
  job.json                          which run this is (checkpoint directory, redundancy)
  alive/<pid>                       one per live rank (its start time): ``outlast shm clean`` test
  node-0000/step-00000120/
    rank-00002/                     a *piece*: a copy of one rank's shard files
      manifest.json                 the step's full manifest (same bytes on every piece)
      piece.json                    {"rank", "world_size", "files": {rel: size}}
      data/w00002.safetensors
    parity-00000/                   rank 0's XOR parity block of its group
      manifest.json  parity.json  block.bin
    .tmp-rank-00003-<pid>/          a piece being written (never listed; removed)
```

A piece is written under a ``.tmp-`` name and renamed into place, so it is either absent
or whole; a snapshot is *complete* when every file of its manifest has an intact copy,
or a rebuildable one, somewhere. Whether a piece is a rank's own or a mirror is only
where it lies. No torch.distributed here.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import time
from typing import Iterable

import xxhash

from ..errors import CheckpointError, CorruptCheckpointError, StorageError
from ..format import MANIFEST_NAME, Manifest
from ..reader import file_problems
from ..storage.local import checksum

DEFAULT_ROOT = "/dev/shm"
PIECE = "piece.json"
PARITY = "parity.json"
BLOCK = "block.bin"


def job_dir(root: str, job_id: str) -> str:
    return os.path.join(root, f"outlast-{job_id}")


def node_dir(root: str, job_id: str, node: int) -> str:
    return os.path.join(job_dir(root, job_id), f"node-{node:04d}")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(name: str) -> int | None:
    if name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    return None


def piece_name(rank: int) -> str:
    return f"rank-{rank:05d}"


def parity_name(rank: int) -> str:
    return f"parity-{rank:05d}"


def _write(path: str, data) -> None:
    with open(path, "wb") as f:
        f.write(data)


def new_piece(node: str, step: int, name: str) -> str:
    """A fresh hidden directory (with ``data/``) to write a piece into."""
    tmp = os.path.join(node, step_name(step), f".tmp-{name}-{os.getpid()}-{time.monotonic_ns()}")
    os.makedirs(os.path.join(tmp, "data"))
    return tmp


def commit_piece(tmp: str, name: str) -> str:
    """Publish a written piece by one rename. A stale piece of the same name (an
    incomplete step from before a restart, being written again) is removed first."""
    final = os.path.join(os.path.dirname(tmp), name)
    if os.path.lexists(final):
        shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return final


def write_piece_meta(tmp: str, manifest: bytes, meta: dict, meta_name: str = PIECE) -> None:
    _write(os.path.join(tmp, MANIFEST_NAME), manifest)
    _write(os.path.join(tmp, meta_name), json.dumps(meta, sort_keys=True).encode())


def register_alive(root: str, job_id: str, info: dict) -> str:
    d = os.path.join(job_dir(root, job_id), "alive")
    os.makedirs(d, exist_ok=True)
    p = os.path.join(d, str(os.getpid()))
    _write(p, str(_start_time(os.getpid())).encode())
    jp = os.path.join(job_dir(root, job_id), "job.json")
    if not os.path.exists(jp):
        tmp = f"{jp}.tmp-{os.getpid()}"
        _write(tmp, json.dumps(info, sort_keys=True).encode())
        os.replace(tmp, jp)
    return p


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
        return int(text.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def job_alive(path: str) -> bool:
    """Whether a process registered under the job directory ``path`` still runs (the
    same process: its start time must match, so a reused pid does not count)."""
    d = os.path.join(path, "alive")
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return False
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(os.path.join(d, name), "rb") as f:
                want = f.read().decode().strip()
        except OSError:
            continue
        got = _start_time(int(name))
        if got is not None and str(got) == want:
            return True
    return False


def list_jobs(root: str = DEFAULT_ROOT) -> list[dict]:
    """Every outlast memory-tier job under ``root``: id, path, alive, bytes, job.json, steps."""
    out = []
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return out
    for name in names:
        path = os.path.join(root, name)
        if not name.startswith("outlast-") or not os.path.isdir(path):
            continue
        info = {}
        try:
            with open(os.path.join(path, "job.json"), "rb") as f:
                info = json.loads(f.read())
        except (OSError, ValueError):
            pass
        steps: dict[int, list[str]] = {}
        for node in _dirs(path, "node-"):
            for s in _dirs(os.path.join(path, node), "step-"):
                st = step_of(s)
                if st is None:
                    continue
                for p in _dirs(os.path.join(path, node, s), ""):
                    if not p.startswith("."):
                        steps.setdefault(st, []).append(f"{node}/{p}")
        out.append({"job_id": name[len("outlast-"):], "path": path, "alive": job_alive(path),
                    "bytes": _du(path), "info": info, "steps": {s: sorted(v) for s, v in sorted(steps.items())}})
    return out


def clean_dead(root: str = DEFAULT_ROOT, *, dry_run: bool = False) -> list[str]:
    """Remove the directories of jobs none of whose ranks is alive; returns their paths."""
    gone = []
    for job in list_jobs(root):
        if not job["alive"]:
            if not dry_run:
                shutil.rmtree(job["path"], ignore_errors=True)
            gone.append(job["path"])
    return gone


def _dirs(path: str, prefix: str) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir(follow_symlinks=False) and e.name.startswith(prefix))
    except FileNotFoundError:
        return []


def _du(path: str) -> int:
    total = 0
    for dp, _, fs in os.walk(path):
        for f in fs:
            try:
                total += os.lstat(os.path.join(dp, f)).st_blocks * 512
            except OSError:
                pass
    return total


# ---------------------------------------------------------------------- inventory


def _read_manifest(piece: str) -> tuple[Manifest, str]:
    p = os.path.join(piece, MANIFEST_NAME)
    with open(p, "rb") as f:
        data = f.read()
    return Manifest.loads(data, p), xxhash.xxh3_64_hexdigest(data)


def file_fault(piece: str, manifest: Manifest, rel: str) -> str | None:
    """Why the copy of data file ``rel`` in ``piece`` cannot be used (None: intact).

    Checks its size, its safetensors header against the manifest, and the checksum of
    every chunk of it the manifest lists: a flipped byte anywhere in tensor data or
    header is found here, before anything is loaded."""
    problems = file_problems(piece, manifest, files=[rel])
    if problems:
        return problems[0]
    path = os.path.join(piece, rel)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                for fqn, e in manifest.tensors.items():
                    for c in e.chunks:
                        if c.file == rel and checksum(view[c.offset : c.offset + c.nbytes]) != c.checksum:
                            return f"checksum mismatch in tensor {fqn!r} (region offsets={list(c.box.offsets)})"
            finally:
                view.release()
    return None


def inventory(node: str, share: tuple[int, int] = (0, 1)) -> dict:
    """What one node directory holds, every copy verified (see :func:`topology.plan_recovery`
    for the shape). ``share=(k, n)``: only every n-th piece from the k-th, so the n ranks of
    a node verify its pieces in parallel (:func:`merge` joins their answers)."""
    inv: dict[int, dict] = {}
    index = -1
    for s in _dirs(node, "step-"):
        step = step_of(s)
        if step is None:
            continue
        sd = os.path.join(node, s)
        entry: dict = {"pieces": {}, "parity": {}, "manifests": {}}
        for name in _dirs(sd, ""):
            if name.startswith("."):
                continue
            index += 1
            if index % share[1] != share[0]:
                continue
            piece = os.path.join(sd, name)
            try:
                manifest, digest = _read_manifest(piece)
            except (OSError, CheckpointError, ValueError):
                continue  # a piece without an intact manifest is no copy of anything
            try:
                if name.startswith("rank-"):
                    with open(os.path.join(piece, PIECE), "rb") as f:
                        meta = json.loads(f.read())
                    bad = {}
                    for rel in meta["files"]:
                        why = file_fault(piece, manifest, rel)
                        if why:
                            bad[rel] = why
                    entry["pieces"][int(meta["rank"])] = {"files": dict(meta["files"]), "bad": bad, "digest": digest}
                elif name.startswith("parity-"):
                    with open(os.path.join(piece, PARITY), "rb") as f:
                        meta = json.loads(f.read())
                    if os.path.getsize(os.path.join(piece, BLOCK)) != meta["s"]:
                        continue
                    meta["sizes"] = {int(q): fs for q, fs in meta["sizes"].items()}
                    meta["digest"] = digest
                    entry["parity"][int(meta["holder"])] = meta
            except (OSError, ValueError, KeyError, TypeError):
                continue
            entry["manifests"][digest] = (manifest.files, manifest.world_size)
        if entry["pieces"] or entry["parity"]:
            inv[step] = entry
    return inv


def merge(parts: list[dict]) -> dict:
    """One node's inventory from the shares its ranks verified."""
    out: dict[int, dict] = {}
    for part in parts:
        for step, entry in part.items():
            e = out.setdefault(step, {"pieces": {}, "parity": {}, "manifests": {}})
            for k in e:
                e[k].update(entry[k])
    return out


def piece_path(node: str, step: int, name: str) -> str:
    return os.path.join(node, step_name(step), name)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def steps_present(node: str) -> list[int]:
    return sorted(s for s in (step_of(n) for n in _dirs(node, "step-")) if s is not None)


def remove_steps(node: str, steps: Iterable[int]) -> None:
    for s in steps:
        shutil.rmtree(os.path.join(node, step_name(s)), ignore_errors=True)


def remove_temp(node: str) -> None:
    """Remove pieces left half-written by a killed rank (never listed, only memory)."""
    for s in _dirs(node, "step-"):
        for name in _dirs(os.path.join(node, s), ".tmp-"):
            shutil.rmtree(os.path.join(node, s, name), ignore_errors=True)


def shm_error(what: str, path: str, e: OSError) -> StorageError:
    return StorageError(
        f"{what}: writing {path} failed ({e.strerror or e}). Shared memory is full or not writable: "
        "free /dev/shm (outlast shm clean removes dead jobs' snapshots), snapshot less often, or "
        "set shm_dir= to a larger tmpfs"
    )


__all__ = [
    "DEFAULT_ROOT", "job_dir", "node_dir", "new_piece", "commit_piece", "inventory", "list_jobs",
    "clean_dead", "file_fault", "CorruptCheckpointError",
]
