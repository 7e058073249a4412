"""Tiny deterministic training states shared by tests (plain module, not a conftest)."""

from __future__ import annotations

import torch


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))


def trained_state(seed: int = 0, steps: int = 2) -> dict:
    model = tiny_model(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=1, gamma=0.5)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(4, 6, generator=g)).square().mean().backward()
        optim.step()
        optim.zero_grad()
        sched.step()
    return {"model": model, "optim": optim, "sched": sched, "step": steps, "rng": torch.get_rng_state()}


def fresh_state(seed: int = 1) -> dict:
    model = tiny_model(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=1, gamma=0.5)
    return {"model": model, "optim": optim, "sched": sched, "step": 0, "rng": torch.zeros_like(torch.get_rng_state())}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def assert_same_as_torch_adamw(ref_params, ref_opt, params, opt, kinds=("exp_avg", "exp_avg_sq")) -> None:
    """Parameters bit-equal pairwise, and ``opt``'s state (indexed as torch numbers parameters:
    across ``ref_opt``'s groups, in order) bit-equal to torch AdamW's ``ref_opt`` state."""
    sd = opt.state_dict()["state"]
    for i, (r, p) in enumerate(zip(list(ref_params), list(params), strict=True)):
        assert torch.equal(r, p), f"param {i} differs by {(r - p).abs().max()}"
    for i, r in enumerate(p for g in ref_opt.param_groups for p in g["params"]):
        if r not in ref_opt.state:
            assert i not in sd
            continue
        for k in kinds:
            assert torch.equal(ref_opt.state[r][k], sd[i][k]), f"{k} of param {i} differs"
        assert float(ref_opt.state[r]["step"]) == float(sd[i]["step"])


def reseal_manifest(ckpt: str, edit) -> dict:
    """Apply ``edit(raw_dict)`` to ``ckpt``'s manifest and rewrite it with a *valid* self-checksum.

    Stands for a crafted (or buggy-writer) manifest that is internally consistent: the
    manifest checksum catches accidental damage, so tests of the deeper checks must get
    past it the way an attacker would.
    """
    import json
    import os

    import xxhash

    mp = os.path.join(ckpt, "manifest.json")
    with open(mp) as f:
        raw = json.load(f)
    edit(raw)
    raw.pop("manifest_checksum", None)
    raw["sealed"] = raw.pop("sealed", True)
    raw["manifest_checksum"] = "0" * 16
    data = json.dumps(raw, indent=1).encode()
    at = data.rindex(b"0" * 16)
    data = data[:at] + xxhash.xxh3_64_hexdigest(data).encode() + data[at + 16:]
    with open(mp, "wb") as f:
        f.write(data)
    return raw


def add_grid_tensor(ckpt: str, path: list, value, cuts: list, writers: int = 3) -> None:
    """Add tensor ``value`` at ``path`` to the committed checkpoint ``ckpt``, stored as the
    cells of the grid ``cuts`` (cut points per dim) spread over ``writers`` new shard files,
    through the real writer (``outlast.shards.write_items``) and manifest code, so the
    manifest lists it in the grid form. For tests of the grid form in one process."""
    import itertools
    import os

    from outlast import dtypes
    from outlast.format import MANIFEST_NAME, Manifest, TensorEntry, fqn_of
    from outlast.regions import Box
    from outlast.shards import SaveItem, write_items

    fqn = fqn_of(path)
    dt = dtypes.to_safetensors(value.dtype)
    items, writer_of = [], []
    for k, cell in enumerate(itertools.product(*(range(len(c) - 1) for c in cuts))):
        lo = tuple(cuts[d][i] for d, i in enumerate(cell))
        sz = tuple(cuts[d][i + 1] - cuts[d][i] for d, i in enumerate(cell))
        part = value[tuple(slice(a, a + n) for a, n in zip(lo, sz))].contiguous()
        items.append(SaveItem(fqn, dt, Box(lo, sz), part, whole=False))
        writer_of.append(k % writers)
    chunks, files = write_items(ckpt, items, writer_of, file_prefix="g")
    mp = os.path.join(ckpt, MANIFEST_NAME)
    with open(mp, "rb") as f:
        m = Manifest.loads(f.read(), mp)
    m.tensors[fqn] = TensorEntry(list(path), dt, tuple(value.shape), chunks[fqn])
    m.files.update(files)
    with open(mp, "wb") as f:
        f.write(m.dumps())
