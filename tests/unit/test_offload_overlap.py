"""OffloadAdamW(overlap_backward=True): updates during backward, results equal torch.optim.AdamW's.

Each case trains the same small model twice, with torch.optim.AdamW and with the overlapped
OffloadAdamW, on the same batches, and compares parameters and state with torch.equal
after every step. Tiny chunks (8 KiB) cut every layer into many chunks, and a backward
hook on the first layer gives the reader time, so chunks really are updated inside
backward(): the tests check that too (``overlapped_chunks``), or they would only test
the drain in step(). The refusals check that each unsound use raises, names the fix,
and leaves the parameters and state as they were (with masters) or the optimizer
refusing to step (without).
"""

from __future__ import annotations

import time

import pytest
import torch

from outlast.errors import StorageError
from state_helpers import assert_same_as_torch_adamw

from outlast.offload import OffloadAdamW

KW = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


class _Net(torch.nn.Sequential):
    def __init__(self):
        super().__init__(torch.nn.Linear(33, 301), torch.nn.Tanh(), torch.nn.Linear(301, 77), torch.nn.Tanh(),
                         torch.nn.Linear(77, 1000), torch.nn.Tanh(), torch.nn.Linear(1000, 5))
        self.unused = torch.nn.Linear(3, 3)  # never gets a gradient: skipped, as torch does

    def forward(self, x):
        for i in range(7):
            x = self[i](x)
        return x


def _model(seed=0):
    torch.manual_seed(seed)
    return _Net()


def _slow_first_layer(m):
    # The first layer's gradients come last in backward: wait a little before them, so the
    # reader has read chunks of the later layers and the hooks update them inside backward().
    m[1].register_full_backward_pre_hook(lambda mod, g: time.sleep(0.05))


def _groups(m):
    return [{"params": list(m[0].parameters()) + list(m.unused.parameters())},
            {"params": list(m[2].parameters()) + list(m[4].parameters()), "lr": 3e-3, "weight_decay": 0.0},
            {"params": list(m[6].parameters()), "betas": (0.8, 0.9)}]


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 33, generator=g), torch.randn(16, 5, generator=g)


def _loss(m, step):
    x, y = _batch(step)
    return torch.nn.functional.mse_loss(m(x), y)


@pytest.mark.parametrize("tier,master,amsgrad", [("disk", False, False), ("disk", True, True), ("host", False, False),
                                                     ("host", True, False)])  # the ZeRO-Offload shape
def test_overlapped_equal_to_torch_adamw(tmp_path, tier, master, amsgrad):
    ref, mine = _model(), _model()
    _slow_first_layer(mine)
    a = torch.optim.AdamW(_groups(ref), amsgrad=amsgrad, **KW)
    b = OffloadAdamW(_groups(mine), dir=str(tmp_path / "st"), tier=tier, chunk_bytes=8192, master_params=master,
                     amsgrad=amsgrad, overlap_backward=True, **KW)
    sa = torch.optim.lr_scheduler.LambdaLR(a, lambda s: 1.0 / (1 + s))
    sb = torch.optim.lr_scheduler.LambdaLR(b, lambda s: 1.0 / (1 + s))
    kinds = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    overlapped = []
    for step in range(6):
        for m, o, s in ((ref, a, sa), (mine, b, sb)):
            if step == 2:
                m[0].weight.requires_grad_(False)  # a parameter without a gradient this step
            _loss(m, step).backward()
            o.step()
            o.zero_grad(set_to_none=step % 2 == 0)  # in-place zeroing too: the hook sees the same tensor again
            s.step()
            m[0].weight.requires_grad_(True)
        assert_same_as_torch_adamw(ref.parameters(), a, mine.parameters(), b, kinds)
        st = b.last_step_stats
        assert st["chunks"] == len(b.layout.chunks)
        overlapped.append(st["overlapped_chunks"])
    assert sum(overlapped) > 0, "no chunk was updated inside backward(): the overlap is not exercised"
    b.close()


def test_overlapped_bf16_with_masters_equal_to_fp32_adamw(tmp_path):
    ref, mine = _model(), _model().to(torch.bfloat16)
    with torch.no_grad():
        for r, p in zip(ref.parameters(), mine.parameters()):
            r.copy_(p.float())  # the same start in both
    a = torch.optim.AdamW(ref.parameters(), **KW)
    b = OffloadAdamW(mine.parameters(), dir=str(tmp_path / "st"), chunk_bytes=8192, master_params=True,
                     overlap_backward=True, **KW)
    for step in range(3):
        x, y = _batch(step)
        torch.nn.functional.mse_loss(mine(x.bfloat16()).float(), y).backward()
        for r, p in zip(ref.parameters(), mine.parameters()):
            r.grad = None if p.grad is None else p.grad.float()  # the fp32 reference gets the same gradients
        # the bf16 gradients were taken as final by the hooks; the masters hold the fp32 truth
        a.step()
        b.step()
        a.zero_grad()
        b.zero_grad()
        sd = b.state_dict()["state"]
        for i, r in enumerate(ref.parameters()):
            if r not in a.state:  # the unused layer: no gradient, no state, in both
                assert i not in sd
                continue
            assert torch.equal(sd[i]["master"], r), f"master {i} differs"
            assert torch.equal(sd[i]["exp_avg"], a.state[r]["exp_avg"])
        for r, p in zip(ref.parameters(), mine.parameters()):
            assert torch.equal(p, r.to(torch.bfloat16))
    b.close()


def test_gradient_accumulation_with_accumulating(tmp_path):
    ref, mine = _model(), _model()
    a = torch.optim.AdamW(ref.parameters(), **KW)
    b = OffloadAdamW(mine.parameters(), dir=str(tmp_path / "st"), chunk_bytes=8192, overlap_backward=True, **KW)
    for step in range(3):
        for m, o in ((ref, a), (mine, b)):
            for mb in range(3):
                if mb < 2 and o is b:
                    with b.accumulating():
                        _loss(m, 10 * step + mb).backward()
                else:
                    _loss(m, 10 * step + mb).backward()
            o.step()
            o.zero_grad()
        assert_same_as_torch_adamw(ref.parameters(), a, mine.parameters(), b)
    b.close()


def _snapshot(m):
    return [p.detach().clone() for p in m.parameters()]


def _equal(m, snap):
    return all(torch.equal(p, s) for p, s in zip(m.parameters(), snap))


def test_second_backward_without_accumulating_is_refused_and_undone(tmp_path):
    m = _model()
    _slow_first_layer(m)
    b = OffloadAdamW(m.parameters(), dir=str(tmp_path / "st"), chunk_bytes=8192, master_params=True,
                     overlap_backward=True, **KW)
    before = _snapshot(m)
    _loss(m, 0).backward()
    with pytest.raises(ValueError, match=r"second gradient before step\(\).*opt.accumulating\(\)"):
        _loss(m, 1).backward()
    assert _equal(m, before)  # the masters put back what the first backward's hooks had updated
    assert b.files.steps == [0] * len(b._params)
    b.zero_grad()
    _loss(m, 0).backward()
    b.step()  # usable again
    assert not _equal(m, before)
    b.close()


@pytest.mark.parametrize("master", [True, False])
def test_gradient_clipping_between_backward_and_step_is_refused(tmp_path, master):
    m = _model()
    _slow_first_layer(m)
    b = OffloadAdamW(m.parameters(), dir=str(tmp_path / "st"), chunk_bytes=8192, master_params=master,
                     overlap_backward=True, **KW)
    before = _snapshot(m)
    _loss(m, 0).backward()
    overlapped = b._session.stream.updated
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1e-3)
    with pytest.raises(ValueError, match=r"gradient of parameter \d+ .* changed between backward\(\) and step\(\).*"
                                         r"overlap_backward=False"):
        b.step()
    assert b.files.steps == [0] * len(b._params)  # the state was not committed
    b.zero_grad()
    if master:
        assert _equal(m, before)
        _loss(m, 0).backward()
        b.step()
    elif overlapped:
        # without masters the parameters updated inside backward() cannot be put back: further
        # steps are refused until a checkpoint is loaded
        with pytest.raises(StorageError, match="partly updated"):
            b.step()
    b.close()


def test_closure_and_changed_lr_are_refused(tmp_path):
    m = _model()
    b = OffloadAdamW(m.parameters(), dir=str(tmp_path / "st"), chunk_bytes=8192, master_params=True,
                     overlap_backward=True, **KW)
    with pytest.raises(ValueError, match="closure"):
        b.step(lambda: _loss(m, 0))
    before = _snapshot(m)
    _loss(m, 0).backward()
    b.param_groups[0]["lr"] = 0.5
    with pytest.raises(ValueError, match=r"lr, betas.*changed between backward\(\) and step\(\).*before backward"):
        b.step()
    b.zero_grad()
    assert _equal(m, before)
    b.close()


def test_step_pre_hooks_run_before_the_first_parameter_changes(tmp_path):
    """The Checkpointer's step pre-hook waits for its copy of the parameters: with the
    update inside backward(), it must run there, before any parameter changes."""
    m = _model()
    _slow_first_layer(m)
    b = OffloadAdamW(m.parameters(), dir=str(tmp_path / "st"), chunk_bytes=8192, overlap_backward=True, **KW)
    before = _snapshot(m)
    seen = []
    b.register_step_pre_hook(lambda opt, args, kwargs: seen.append(_equal(m, before)))
    _loss(m, 0).backward()
    assert b._session.stream.updated > 0 or b.last_step_stats == {}
    assert seen == [True]  # ran inside backward, before the first update
    b.step()
    assert seen == [True, False]  # and again from step(), as torch's wrapper does
    b.close()
