"""OffloadAdamW against torch.optim.AdamW: bit-for-bit equal parameters and state.

Every case builds the same parameters twice, steps torch.optim.AdamW (its CPU default,
the single-tensor path) and OffloadAdamW on identical gradients, and compares with
torch.equal: any change to the chunking, the pipeline or the math breaks them.
"""

from __future__ import annotations

import pytest
import torch

from state_helpers import assert_same_as_torch_adamw

from outlast.offload import OffloadAdamW
from outlast.offload.layout import ALIGN_ELEMS, StateLayout
from outlast.offload.pool import BufferPool
from outlast.offload.stream import run_pipeline

# Odd sizes: smaller than a chunk, not multiples of the vector width or of the 1024-element
# alignment, and one spanning several chunks.
SHAPES = [(37,), (1000, 77), (5, 3), (4097,), (2, 3001), (1,)]


def _params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_(True) for s in SHAPES]


def _groups(ps, lr=1e-2, **extra):
    return [
        {"params": ps[:2]},
        {"params": ps[2:4], "lr": lr * 0.3, "weight_decay": 0.0},
        {"params": ps[4:], "betas": (0.8, 0.9), "weight_decay": 0.5},
    ]


def _grads(ps, step, drop=()):
    g = torch.Generator().manual_seed(1000 + step)
    return [None if i in drop else torch.randn(p.shape, generator=g) for i, p in enumerate(ps)]


def _set(ps, grads, dtype=None):
    for p, g in zip(ps, grads):
        p.grad = None if g is None else g.clone().to(dtype or p.dtype)


@pytest.mark.parametrize("fused", [None, True])
@pytest.mark.parametrize("tier", ["disk", "host"])
@pytest.mark.parametrize("amsgrad,maximize", [(False, False), (True, False), (False, True)])
def test_equal_to_torch_adamw(tmp_path, tier, amsgrad, maximize, fused):
    """fused=True is compared with torch.optim.AdamW(fused=True), the default with the default."""
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, amsgrad=amsgrad, maximize=maximize,
              fused=fused)
    ref, mine = _params(), _params()
    a = torch.optim.AdamW(_groups(ref), **kw)
    # 8 KiB chunks: 2048 elements, so most parameters are cut into pieces and small ones share chunks.
    b = OffloadAdamW(_groups(mine), dir=str(tmp_path / "st"), tier=tier, chunk_bytes=8192, **kw)
    sa = torch.optim.lr_scheduler.LambdaLR(a, lambda s: 1.0 / (1 + s))
    sb = torch.optim.lr_scheduler.LambdaLR(b, lambda s: 1.0 / (1 + s))
    kinds = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    for step in range(7):
        drop = {1} if step in (0, 3) else set()  # a parameter without a gradient is skipped, as torch does
        grads = _grads(ref, step, drop)
        _set(ref, grads)
        _set(mine, grads)
        a.step()
        b.step()
        sa.step()
        sb.step()
        assert_same_as_torch_adamw(ref, a, mine, b, kinds)
    assert [g["lr"] for g in a.param_groups] == [g["lr"] for g in b.param_groups]
    b.close()


def test_fused_is_the_fused_kernel(tmp_path):
    """The two kernels round differently, so comparing fused=True with torch's fused (above)
    would fail if the flag were ignored: check that these shapes do show the difference."""
    ref, mine = _params(), _params()
    a = torch.optim.AdamW(_groups(ref), lr=1e-2, weight_decay=0.1)
    b = OffloadAdamW(_groups(mine), dir=str(tmp_path / "st"), chunk_bytes=8192, lr=1e-2, weight_decay=0.1, fused=True)
    for step in range(3):
        grads = _grads(ref, step)
        _set(ref, grads)
        _set(mine, grads)
        a.step()
        b.step()
    assert any(not torch.equal(r, m) for r, m in zip(ref, mine))
    assert all(torch.allclose(r, m, rtol=1e-6, atol=1e-7) for r, m in zip(ref, mine))
    assert all(g["fused"] for g in b.state_dict()["param_groups"])
    b.close()


@pytest.mark.parametrize("fused", [None, True])
def test_master_params_bf16_equal_to_fp32_adamw(tmp_path, fused):
    """bf16 model, fp32 masters offloaded: the masters follow torch AdamW on fp32 copies of
    the parameters fed the bf16 gradients, and each parameter is its master rounded to bf16."""
    kw = dict(lr=1e-2, weight_decay=0.1, fused=fused)
    ref = _params()
    mine = [p.detach().to(torch.bfloat16).requires_grad_(True) for p in ref]
    with torch.no_grad():
        for r, m in zip(ref, mine):
            r.copy_(m.float())  # the masters start from the bf16 values
    a = torch.optim.AdamW(_groups(ref), **kw)
    b = OffloadAdamW(_groups(mine), dir=str(tmp_path / "st"), master_params=True, chunk_bytes=8192, **kw)
    for step in range(4):
        grads = [g.to(torch.bfloat16) for g in _grads(ref, step)]
        _set(ref, [g.float() for g in grads])
        _set(mine, grads)
        a.step()
        b.step()
        sd = b.state_dict()["state"]
        for i, (r, m) in enumerate(zip(ref, mine)):
            assert torch.equal(sd[i]["master"], r.detach()), f"master {i}"
            assert torch.equal(m.detach(), r.detach().to(torch.bfloat16)), f"param {i}"
            assert torch.equal(sd[i]["exp_avg_sq"], a.state[r]["exp_avg_sq"])
    b.close()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("tier", ["host", "disk"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_parameters_on_a_device_step_on_the_cpu(tmp_path, device, tier, dtype):
    """The ZeRO-Offload shape: parameters (and their gradients) on the accelerator, fp32 masters
    and moments in the tier, the update on the CPU. Each step copies the gradients device->host
    and the updated parameters host->device; the masters follow torch AdamW on fp32 CPU copies
    bit for bit and each parameter is its master in the parameter's dtype, on its device. The
    CPU case runs the same test everywhere, so its logic is checked where no GPU is."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA: gradients device->host and parameters host->device")
    kw = dict(lr=1e-2, weight_decay=0.1)
    ref = _params()
    mine = [p.detach().to(dtype).to(device).requires_grad_(True) for p in ref]
    with torch.no_grad():
        for r, m in zip(ref, mine):
            r.copy_(m.float().cpu())  # the masters start from the parameters' values
    a = torch.optim.AdamW(_groups(ref), **kw)
    b = OffloadAdamW(_groups(mine), dir=str(tmp_path / "st"), tier=tier, master_params=True, chunk_bytes=8192, **kw)
    for step in range(4):
        grads = [g.to(dtype) for g in _grads(ref, step)]
        _set(ref, [g.float() for g in grads])
        _set(mine, [g.to(device) for g in grads])
        a.step()
        b.step()
        sd = b.state_dict()["state"]
        for i, (r, m) in enumerate(zip(ref, mine)):
            assert m.device.type == device, f"param {i} left {device}"
            assert torch.equal(sd[i]["master"], r.detach()), f"master {i} at step {step}"
            assert torch.equal(m.detach().cpu(), r.detach().to(dtype)), f"param {i} at step {step}"
            assert torch.equal(sd[i]["exp_avg_sq"], a.state[r]["exp_avg_sq"])
    b.close()


def test_state_dict_round_trips_with_torch_adamw(tmp_path):
    """torch AdamW -> OffloadAdamW -> torch AdamW mid-run gives the run torch alone gives."""
    kw = dict(lr=5e-3, weight_decay=0.05)
    ref, mid = _params(), _params()
    a = torch.optim.AdamW(_groups(ref), **kw)
    a2 = torch.optim.AdamW(_groups(mid), **kw)
    for step in range(3):
        _set(ref, _grads(ref, step))
        _set(mid, _grads(mid, step))
        a.step()
        a2.step()
    b = OffloadAdamW(_groups(mid), dir=str(tmp_path / "st"), chunk_bytes=8192, **kw)
    b.load_state_dict(a2.state_dict())
    for step in range(3, 6):
        _set(ref, _grads(ref, step))
        _set(mid, _grads(mid, step))
        a.step()
        b.step()
    assert_same_as_torch_adamw(ref, a, mid, b)
    back = torch.optim.AdamW(_groups(mid), **kw)
    back.load_state_dict(b.state_dict())
    b.close()
    for step in range(6, 8):
        _set(ref, _grads(ref, step))
        _set(mid, _grads(mid, step))
        a.step()
        back.step()
    for r, m in zip(ref, mid):
        assert torch.equal(r, m)
        assert torch.equal(a.state[r]["exp_avg"], back.state[m]["exp_avg"])


def test_reopen_continues_from_files(tmp_path):
    kw = dict(lr=1e-2)
    ref, mine = _params(), _params()
    a = torch.optim.AdamW(_groups(ref), **kw)
    b = OffloadAdamW(_groups(mine), dir=str(tmp_path / "st"), chunk_bytes=8192, **kw)
    for step in range(2):
        _set(ref, _grads(ref, step)), _set(mine, _grads(mine, step))
        a.step(), b.step()
    b.close()
    b = OffloadAdamW(_groups(mine), dir=str(tmp_path / "st"), chunk_bytes=8192, reopen=True, **kw)
    for step in range(2, 4):
        _set(ref, _grads(ref, step)), _set(mine, _grads(mine, step))
        a.step(), b.step()
    assert_same_as_torch_adamw(ref, a, mine, b)
    b.close()


def test_reopen_with_masters_restores_the_parameters(tmp_path):
    ps = [p.detach().to(torch.bfloat16).requires_grad_(True) for p in _params()]
    b = OffloadAdamW(ps, dir=str(tmp_path / "st"), master_params=True, chunk_bytes=8192)
    _set(ps, _grads(ps, 0))
    b.step()
    after = [p.detach().clone() for p in ps]
    b.close()
    fresh = [torch.zeros_like(p).requires_grad_(True) for p in ps]
    OffloadAdamW(fresh, dir=str(tmp_path / "st"), master_params=True, chunk_bytes=8192, reopen=True).close()
    for f, a in zip(fresh, after):
        assert torch.equal(f.detach(), a)


def test_refusals(tmp_path):
    ps = _params()
    with pytest.raises(ValueError, match="master_params=True"):
        OffloadAdamW([p.detach().half().requires_grad_() for p in ps], dir=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="needs dir"):
        OffloadAdamW(ps)
    with pytest.raises(ValueError, match="same in every param group"):
        OffloadAdamW([{"params": ps[:2], "amsgrad": True}, {"params": ps[2:]}], dir=str(tmp_path / "b"))
    opt = OffloadAdamW(ps[:2], dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="add_param_group"):
        opt.add_param_group({"params": ps[2:]})
    opt.close()


def test_layout_tiles_every_parameter():
    numels = [1, 1023, 1024, 1025, 5000, 0, 7]
    lay = StateLayout.build(numels, chunk_elems=2 * ALIGN_ELEMS)
    seen = {i: [] for i in range(len(numels))}
    for c in lay.chunks:
        assert c.start % ALIGN_ELEMS == 0 and c.numel <= lay.chunk_elems
        for pc in c.pieces:
            assert lay.offsets[pc.param] + pc.lo == c.start + pc.buf_lo
            assert pc.lo % ALIGN_ELEMS == 0  # the same vector alignment as the whole tensor
            seen[pc.param].append((pc.lo, pc.hi))
    for i, n in enumerate(numels):
        covered = sorted(seen[i])
        assert sum(hi - lo for lo, hi in covered) == n
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # no gap, no overlap
    assert lay.total % ALIGN_ELEMS == 0 and lay.chunks[-1].stop == lay.total


def test_pipeline_reports_the_first_error_and_returns_every_buffer():
    pool = BufferPool(3, 1, 4096)
    written = []

    def write(c, b):
        if c == 5:
            raise OSError(28, "No space left on device")
        written.append(c)

    with pytest.raises(OSError, match="No space"):
        run_pipeline(range(20), pool, lambda c, b: None, lambda c, b: None, write, timeout_s=30)
    assert written == [0, 1, 2, 3, 4]
    got = [pool.acquire(timeout=1) for _ in range(3)]  # all three sets came back
    assert sorted(got) == [0, 1, 2]
