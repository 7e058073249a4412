"""Loading: restore in place (:func:`load`) or read a fresh nested dict (:func:`read`).

``load`` matches the live state to the manifest (:func:`plan_load`), fills every tensor
through the read engine (``CheckpointReader.read_regions`` in one process; the same
planner and executor plus an exchange between ranks in a distributed load), replaces
plain values and hands Stateful objects their filled state dicts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import xxhash

from . import dtypes, grid
from .collective import Group, group_of, raise_gathered
from .errors import DistributedError, IncompatibleStateError
from .format import Manifest, TensorEntry, fqn_of
from .layouts import local_tensor
from .plan import RankMeta, RegionMeta, StoredChunk, TensorMeta, Want, plan_load_reads
from .reader import CheckpointReader, ReadRequest, check_data_files, open_manifest
from .regions import Box
from .tree import FlatState, flatten, insert


@dataclass
class LoadReport:
    """What :func:`load` did. ``missing``: live keys the checkpoint lacks; ``unexpected``:
    checkpoint keys under the state's top-level names that the live state lacks.

    Counters are this rank's: ``bytes_read`` from storage, ``bytes_received`` from other
    ranks (pieces another rank read once for several), ``bytes_sent`` to other ranks.
    """

    path: str
    step: int | None
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    bytes_read: int = 0
    tensors_loaded: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    preads: int = 0
    rank: int = 0
    world_size: int = 1


def _top(fqn_path: list) -> Any:
    p = fqn_path[0]
    return p[0] if isinstance(p, list) else p


def _stateful_owner(path: list, flat: FlatState) -> tuple[Any, list] | None:
    for k in range(len(path), 0, -1):
        node = flat.statefuls.get(fqn_of(path[:k]))
        if node is not None:
            return node, path[k:]
    return None


def _match_types(template: Any, value: Any) -> Any:
    if isinstance(template, tuple) and isinstance(value, list):
        return tuple(_match_types(t, v) for t, v in zip(template, value)) if len(template) == len(value) else tuple(value)
    if isinstance(template, dict) and isinstance(value, dict):
        return {k: _match_types(template.get(k), v) for k, v in value.items()}
    if isinstance(template, list) and isinstance(value, list) and len(template) == len(value):
        return [_match_types(t, v) for t, v in zip(template, value)]
    return value


def plan_load(
    flat: FlatState, manifest: Manifest, ckpt: str, strict: bool, layouts: dict | None = None
) -> tuple[list[ReadRequest], LoadReport, list]:
    """Match live leaves with checkpoint entries; return read requests and a report.

    ``layouts``, if given, receives every matched tensor's ``LocalTensor`` (in order).

    Raises IncompatibleStateError for shape/dtype conflicts, and in strict mode for
    missing or unexpected keys.
    """
    report = LoadReport(ckpt, manifest.step)
    requests: list[ReadRequest] = []
    for fqn, leaf in flat.tensors.items():
        e = manifest.tensors.get(fqn)
        if e is None:
            if fqn in manifest.plain:
                raise IncompatibleStateError(f"{fqn!r} is a tensor in the live state but a plain value in checkpoint {ckpt}")
            report.missing.append(fqn)
            continue
        lt = local_tensor(fqn, leaf.value)
        want = dtypes.from_safetensors(e.dtype)
        if tuple(lt.global_shape) != tuple(e.shape):
            raise IncompatibleStateError(
                f"tensor {fqn!r}: checkpoint {ckpt} has shape {list(e.shape)}, the live tensor has "
                f"{list(lt.global_shape)}. Build the model with the checkpoint's configuration."
            )
        if lt.dtype != want:
            raise IncompatibleStateError(
                f"tensor {fqn!r}: checkpoint {ckpt} has dtype {want}, the live tensor has {lt.dtype}. "
                "Cast the model (e.g. model.to(dtype)) before loading, or convert the checkpoint."
            )
        requests += [ReadRequest(fqn, r.box, r.data) for r in lt.regions]
        if layouts is not None:
            layouts[fqn] = lt
    for fqn in flat.plain:
        if fqn not in manifest.plain:
            if fqn in manifest.tensors:
                raise IncompatibleStateError(f"{fqn!r} is a plain value in the live state but a tensor in checkpoint {ckpt}")
            prefix = fqn + "."
            fills_container = any(k.startswith(prefix) for k in manifest.tensors) or any(k.startswith(prefix) for k in manifest.plain)
            if not fills_container:
                report.missing.append(fqn)
    tops = {_top(leaf.path) for leaf in list(flat.tensors.values()) + list(flat.plain.values())}
    tops |= {_top(n.path) for n in flat.statefuls.values() if n.path}
    extras = []
    for fqn, entry in list(manifest.tensors.items()) + list(manifest.plain.items()):
        if fqn in flat.tensors or fqn in flat.plain or _top(entry.path) not in tops:
            continue
        owner = _stateful_owner(entry.path, flat)
        if owner is not None:
            extras.append((fqn, entry, owner))
        else:
            report.unexpected.append(fqn)
    if strict and (report.missing or report.unexpected):
        def show(xs: list[str]) -> str:
            return ", ".join(xs[:8]) + (f" (+{len(xs) - 8} more)" if len(xs) > 8 else "")
        parts = []
        if report.missing:
            parts.append(f"missing from the checkpoint: {show(report.missing)}")
        if report.unexpected:
            parts.append(f"in the checkpoint but not in the live state: {show(report.unexpected)}")
        raise IncompatibleStateError(
            f"state does not match checkpoint {ckpt}: " + "; ".join(parts)
            + ". Pass strict=False to load what matches and get a report."
        )
    return requests, report, extras


def load(
    state: dict,
    path: str | os.PathLike,
    *,
    strict: bool = True,
    verify: bool = True,
    process_group: Any = None,
) -> LoadReport:
    """Load a checkpoint in place into live ``state``.

    Tensors are copied into the existing tensors (shape and dtype checked; any device),
    plain values are replaced, Stateful objects get ``load_state_dict`` with their filled
    state dict. Top-level names absent from ``state`` are ignored, so loading only
    ``{"model": model}`` from a model+optimizer checkpoint works.

    Collective when ``torch.distributed`` is initialised: every rank passes its own
    layout (any mix of plain tensors, DTensors and FlatShards, at any world size — not
    necessarily the one that saved). Each rank reads from storage only the rows its
    regions need; data several ranks need (DDP replicas) is read once, by one of them,
    and sent to the others over the process group.

    Args:
        state: the live nested state, as given to :func:`save`.
        path: a committed checkpoint directory (on a filesystem every rank sees).
        strict: raise if a live key is missing from the checkpoint, or the checkpoint has
            keys under a top-level name of ``state`` that the live state lacks.
        verify: check the checksum of every byte read (whole chunks, or the checksum
            blocks of a partly read chunk; costs a little CPU).
        process_group: the group to load with (default: the world group).

    Returns:
        A :class:`LoadReport` with missing and unexpected keys and this rank's counters
        (``bytes_read`` from storage, ``bytes_received`` / ``bytes_sent`` between ranks).

    Raises:
        IncompatibleStateError: shapes, dtypes or keys do not match (on every rank).
        CorruptCheckpointError: a file is missing or damaged (on every rank).
        DistributedError: ranks disagree (e.g. see different files at ``path``).

    Example:
        >>> report = outlast.load({"model": model, "optim": opt}, "ckpt/step-100")
    """
    path = os.fspath(path)
    _wait_for_saves_in_flight(state)
    group = group_of(process_group)
    if group is not None:
        return _load_distributed(state, path, strict, verify, group)
    flat = flatten(state)
    with CheckpointReader(path) as reader:
        manifest = reader.manifest
        requests, report, extras = plan_load(flat, manifest, path, strict)
        stats = reader.read_regions(requests, verify=verify)
        report.bytes_read = stats.bytes_read
        report.preads = stats.chunks_read
        report.tensors_loaded = len({r.fqn for r in requests})
        _finish_load(flat, manifest, reader, extras, report, verify)
    return report


def _wait_for_saves_in_flight(state: dict) -> None:
    """Optimizers whose state lives in files a background save may still be writing from
    (``OffloadAdamW``): wait for those saves before the load writes into the same files."""
    from .engine import find_owners

    for opt in find_owners(state)[0]:
        wait = getattr(opt, "wait_for_checkpoints", None)
        if callable(wait):
            wait()


def _load_distributed(state: dict, path: str, strict: bool, verify: bool, group: Group) -> LoadReport:
    from .transfer import TransferStats, check_coverage, exchange, read_mine

    what = f"loading checkpoint {path}"
    err: BaseException | None = None
    reader = None
    requests: list[ReadRequest] = []
    want_meta = None
    digest = None
    try:
        # Each rank checks its share of the data files (size, safetensors header) and the
        # outcome is exchanged below, so a job opens every header once, not once per rank.
        reader = CheckpointReader(path, check_files=False)
        check_data_files(path, reader.manifest, sorted(reader.manifest.files)[group.rank :: group.size])
        flat = flatten(state)
        lts: dict = {}
        requests, report, extras = plan_load(flat, reader.manifest, path, strict, lts)
        want_meta = _want_meta(reader.manifest, lts, requests, group)
        digest = reader.manifest.source_digest or xxhash.xxh3_64_hexdigest(reader.manifest.dumps())
    except Exception as e:  # noqa: BLE001 - sent to every rank, then re-raised
        err = e
    try:
        ldig = None if want_meta is None else grid.layout_digest(want_meta)
        gathered = group.all_gather((None if err is None else (type(err).__name__, str(err)), digest, ldig), what)
        raise_gathered(err, [g[0] for g in gathered], what)
        if len({g[1] for g in gathered}) != 1:
            raise DistributedError(
                f"{what}: ranks read different manifests at {path}. Every rank must see the same "
                "checkpoint: put it on a filesystem all ranks share (and do not load while saving to it)."
            )
        m = reader.manifest
        # Wanted layouts: a digest from every rank, a descriptor per class of equal ones,
        # boxes from ranks without grids (outlast.grid).
        classes, rep = grid.exchange_classes([g[2] for g in gathered])
        sent = group.all_gather(grid.payload(want_meta, group.rank, rep), what)
        classes = [(ranks, sent[ranks[0]]) for ranks in classes]
        plan = _grid_load_plan(m, classes, group, verify, requests)
        if plan is None:
            all_wants = [
                Want(r.fqn, r.box, rank, i)
                for ranks, desc in classes
                for rank in ranks
                for i, r in enumerate((desc if desc.grids is None else grid.expand(desc, rank)).regions)
            ]
            check_coverage(path, reader, all_wants)  # same data on every rank: same outcome
            fqns = {w.fqn for w in all_wants}
            chunks = [
                StoredChunk(fqn, i, c.box, dtypes.itemsize(m.tensors[fqn].dtype), c.block_rows)
                for fqn in sorted(fqns)
                for i, c in enumerate(m.tensors[fqn].chunks)
            ]
            plan = plan_load_reads(chunks, all_wants, group.size, verify=verify)
        stats = TransferStats()
        err = None
        outgoing: dict = {}
        try:
            outgoing = read_mine(reader, plan, group.rank, requests, stats)
        except Exception as e:  # noqa: BLE001
            err = e
        raise_gathered(err, group.all_gather(None if err is None else (type(err).__name__, str(err)), what), what)
        exchange(group, plan, reader, requests, outgoing, stats)
        report.bytes_read = stats.bytes_read
        report.bytes_received = stats.bytes_received
        report.bytes_sent = stats.bytes_sent
        report.preads = stats.preads
        report.rank, report.world_size = group.rank, group.size
        report.tensors_loaded = len({q.fqn for q in requests})
        err = None
        try:
            _finish_load(flat, m, reader, extras, report, verify)
        except Exception as e:  # noqa: BLE001 - a Stateful's load_state_dict failing on one rank fails all
            err = e
        raise_gathered(err, group.all_gather(None if err is None else (type(err).__name__, str(err)), what), what)
    finally:
        if reader is not None:
            reader.close()
    return report


def _want_meta(m: Manifest, lts: dict, requests: list[ReadRequest], group: Group) -> RankMeta:
    """This rank's wanted layout: its requests' boxes, and grids where every tensor has one."""
    from .saving import group_rank_map

    tensors = {
        fqn: TensorMeta((fqn,), m.tensors[fqn].dtype, tuple(m.tensors[fqn].shape), dtypes.itemsize(m.tensors[fqn].dtype))
        for fqn in lts
    }
    regions = [RegionMeta(q.fqn, q.box) for q in requests]
    grids = {fqn: lt.grid for fqn, lt in lts.items()}
    if any(g is None for g in grids.values()):
        grids = None
    return grid.checked(RankMeta(tensors, regions, grids), group.rank, group_rank_map(group))


def stored_grids(m: Manifest, fqns) -> dict[str, "grid.StoredGrid | None"]:
    """The product grid of each tensor's stored chunks (None where they are not one).

    A grid-encoded tensor gives its grid as stored (its chunk list is in cell order);
    the chunks of any other tensor are tested for one."""
    out = {}
    for fqn in fqns:
        e = m.tensors[fqn]
        if e.grid is not None:
            g = e.grid
            out[fqn] = grid.StoredGrid(g.cuts, np.arange(len(g), dtype=np.int64), g.block_rows_array(), g.itemsize)
            continue
        n, nd = len(e.chunks), len(e.shape)
        offsets = np.fromiter((o for c in e.chunks for o in c.box.offsets), dtype=np.int64, count=n * nd)
        sizes = np.fromiter((s for c in e.chunks for s in c.box.sizes), dtype=np.int64, count=n * nd)
        block_rows = np.fromiter((c.block_rows for c in e.chunks), dtype=np.int64, count=n)
        out[fqn] = grid.stored_grid(e.shape, offsets.reshape(n, nd), sizes.reshape(n, nd), block_rows, dtypes.itemsize(e.dtype))
    return out


def _grid_load_plan(m: Manifest, classes: list, group: Group, verify: bool, requests: list[ReadRequest]):
    """This rank's view of a grid load plan, or None (then plan from explicit boxes)."""
    if any(desc.grids is None for _, desc in classes):
        return None
    fqns = sorted({fqn for _, desc in classes for fqn in desc.tensors})
    plan = grid.plan_load_layouts(stored_grids(m, fqns), classes, group.size, verify=verify)
    if plan is None:
        return None
    return plan.view(group.rank, {q.fqn: i for i, q in enumerate(requests)})


def _finish_load(flat: FlatState, manifest: Manifest, reader: CheckpointReader, extras: list, report: LoadReport, verify: bool) -> None:
    # Entries only the checkpoint has, under a Stateful object (e.g. optimizer state
    # of an optimizer that has not stepped yet): materialise them for the object.
    for fqn, entry, (node, rel) in extras:
        if isinstance(entry, TensorEntry):
            value = reader.read_tensor(fqn, verify=verify)
            report.bytes_read += entry.nbytes
        else:
            value = entry.value
        if not isinstance(node.state, dict):
            raise IncompatibleStateError(f"cannot restore {fqn!r}: state_dict() of {type(node.obj).__name__} is not a dict")
        insert(node.state, rel, value)
    for fqn, leaf in flat.plain.items():
        pe = manifest.plain.get(fqn)
        if pe is None:
            continue
        if leaf.parent is None and fqn in flat.statefuls:
            # The object's whole state_dict is one plain value (e.g. an empty dict).
            flat.statefuls[fqn].state = _match_types(leaf.original, pe.value)
            continue
        if isinstance(leaf.parent, tuple):
            raise IncompatibleStateError(f"cannot restore plain value {fqn!r} inside a tuple; use a list in the state")
        leaf.parent[leaf.key] = _match_types(leaf.original, pe.value)
    # Innermost objects first, so an outer object receives already-restored children.
    for fqn in sorted(flat.statefuls, key=lambda k: -len(flat.statefuls[k].path)):
        node = flat.statefuls[fqn]
        node.obj.load_state_dict(node.state)


def _selected(fqn: str, keys: Sequence[str] | None) -> bool:
    return keys is None or any(fqn == k or fqn.startswith(k + ".") for k in keys)


def read(path: str | os.PathLike, keys: Iterable[str] | str | None = None, *, verify: bool = True) -> dict:
    """Read a checkpoint into a new nested dict of full CPU tensors and plain values.

    Works for any checkpoint, whatever layout saved it. Nesting is rebuilt exactly
    (lists stay lists, int keys stay ints); Stateful objects come back as their state dicts.

    Args:
        path: a committed checkpoint directory.
        keys: dotted names or prefixes to read (e.g. ``"model"`` or
            ``["model.embed.weight", "step"]``); default everything.
        verify: check chunk checksums.

    Example:
        >>> sd = outlast.read("ckpt/step-100", keys="model")["model"]
    """
    path = os.fspath(path)
    if isinstance(keys, str):
        keys = [keys]
    keys = list(keys) if keys is not None else None
    out: dict = {}
    with CheckpointReader(path) as reader:
        m = reader.manifest
        if keys is not None:
            names = list(m.tensors) + list(m.plain)
            unknown = [k for k in keys if not any(_selected(n, [k]) for n in names)]
            if unknown:
                tops = sorted({n.split(".", 1)[0] for n in names})
                raise IncompatibleStateError(f"checkpoint {path} has no entries named {unknown}; top-level names: {tops}")
        wanted = [(fqn, e) for fqn, e in m.tensors.items() if _selected(fqn, keys)]
        tensors = {fqn: torch.empty(e.shape, dtype=dtypes.from_safetensors(e.dtype)) for fqn, e in wanted}
        reader.read_regions([ReadRequest(fqn, Box.full(e.shape), tensors[fqn]) for fqn, e in wanted], verify=verify)
        for fqn, e in wanted:
            insert(out, e.path, tensors[fqn])
        for fqn, p in m.plain.items():
            if _selected(fqn, keys):
                insert(out, p.path, p.value)
    return out


def manifest_of(path: str | os.PathLike) -> Manifest:
    """The validated manifest of a committed checkpoint."""
    return open_manifest(os.fspath(path))
