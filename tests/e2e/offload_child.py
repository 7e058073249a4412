"""Child process of the offload memory tests and of bench/offload.py: train a residual MLP
for a few steps with OffloadAdamW or torch.optim.AdamW and print one JSON line.

``python tests/e2e/offload_child.py --layers 8 --width 1024 --dtype float32 --optim offload --dir D``

The line holds the losses, per-step wall / forward+backward / stage times, the peak
anonymous and file-backed RSS over a 20 ms sampler (above the interpreter's own, measured
before the model is built), the page cache of the process's memory cgroup, and with
``--raw-io`` the time of a pass that reads and writes the same bytes as a step through
the same pipeline without the update (the disk's bound for the step).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import threading
import time

import torch


class Residual(torch.nn.Module):
    """x + tanh(W x): gradients neither vanish nor blow up through many layers (vanishing
    ones would make AdamW's state denormal, which costs x86 CPUs 10-100x per operation)."""

    def __init__(self, width: int, dtype: torch.dtype):
        super().__init__()
        self.lin = torch.nn.Linear(width, width, bias=False, dtype=dtype)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


def build(layers: int, width: int, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[Residual(width, dtype) for _ in range(layers)])


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) * 1024
    return out


def _cgroup_cache() -> int:
    try:
        for line in open("/proc/self/cgroup"):
            _, ctrls, path = line.strip().split(":", 2)
            if "memory" in ctrls.split(","):
                stat = f"/sys/fs/cgroup/memory{path}/memory.stat"
                for l in open(stat):
                    if l.startswith("cache "):
                        return int(l.split()[1])
            if ctrls == "" and os.path.exists(f"/sys/fs/cgroup{path}/memory.stat"):
                for l in open(f"/sys/fs/cgroup{path}/memory.stat"):
                    if l.startswith("file "):
                        return int(l.split()[1])
    except OSError:
        pass
    return -1


class Sampler:
    def __init__(self):
        self.peak = {"RssAnon": 0, "RssFile": 0, "RssShmem": 0, "cache": 0}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            s = _status()
            s["cache"] = _cgroup_cache()
            for k, v in s.items():
                self.peak[k] = max(self.peak[k], v)
            self._stop.wait(0.02)

    def stop(self):
        self._stop.set()
        self._t.join()
        return self.peak


def raw_io(opt) -> float:
    """Seconds to read and write every byte a step moves, through the same pipeline, no update."""
    from outlast.offload.stream import run_pipeline

    files, chunks, kinds = opt.files, opt.layout.chunks, opt.kinds
    src, dst = files.generation, files.next_generation()

    def read(c, bufs):
        n = chunks[c].numel * 4
        for k, kind in enumerate(kinds):
            files.read(kind, src, chunks[c].start, bufs[k][:n])

    def write(c, bufs):
        n = chunks[c].numel * 4
        for k, kind in enumerate(kinds):
            files.write(kind, dst, chunks[c].start, bufs[k][:n])

    t0 = time.perf_counter()
    run_pipeline(range(len(chunks)), opt.pool, read, lambda c, b: None, write)
    files.flush(dst)  # the other generation is scratch until a step commits it: the state is untouched
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--optim", choices=["offload", "torch"], default="offload")
    ap.add_argument("--master", action="store_true")
    ap.add_argument("--dir", default="")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--chunk-mb", type=int, default=16)
    ap.add_argument("--overlap", action="store_true", help="OffloadAdamW(overlap_backward=True)")
    ap.add_argument("--overlap-forward", action="store_true",
                    help="OffloadAdamW(overlap_forward=True): the next forward finishes each step")
    ap.add_argument("--fused", action="store_true", help="fused=True for either optimizer (torch's fused AdamW kernel)")
    ap.add_argument("--pool-sets", type=int, default=4)
    ap.add_argument("--save", default="", help="outlast.save the optimizer here after training")
    ap.add_argument("--save-async", default="", help="save the optimizer with an outlast.Checkpointer under this directory")
    ap.add_argument("--drop-save", action="store_true",
                    help="after --save, record the bytes it wrote and delete it (room on disk for --save-async)")
    ap.add_argument("--raw-io", action="store_true", help="also time a read+write pass of the same bytes")
    ap.add_argument("--raw-every", type=int, default=0,
                    help="interleave: after the first step and then after every K steps, finish the step "
                         "(synchronize, timed as part of it) and time a raw pass (recorded in raw_between_s)")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    import outlast.offload  # noqa: F401  - the baseline includes every library either mode imports
    import outlast.offload.stream  # noqa: F401

    base = _status()
    sampler = Sampler()
    model = build(a.layers, a.width, dtype)
    n = sum(p.numel() for p in model.parameters())
    kw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True if a.fused else None)
    if a.optim == "offload":
        from outlast.offload import OffloadAdamW

        opt = OffloadAdamW(model.parameters(), dir=a.dir, master_params=a.master, chunk_bytes=a.chunk_mb << 20,
                           overlap_backward=a.overlap, overlap_forward=a.overlap_forward, pool_sets=a.pool_sets,
                           **kw)
        if a.overlap_forward:
            opt.attach(model)
    else:
        opt = torch.optim.AdamW(model.parameters(), **kw)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(a.batch, a.width, generator=g).to(dtype)
    y = torch.randn(a.batch, a.width, generator=g).to(dtype)
    losses, step_s, compute_s, stats, raw_between = [], [], [], [], []
    for i in range(a.steps):
        t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        between = a.raw_every and a.optim == "offload" and i % a.raw_every == 0
        if between:
            opt.synchronize()  # the step's deferred work counts as the step's, before the raw pass
        t2 = time.perf_counter()
        losses.append(loss.item())
        compute_s.append(t1 - t0)
        step_s.append(t2 - t0)
        stats.append({k: round(v, 4) for k, v in getattr(opt, "last_step_stats", {}).items()})
        if between:
            raw_between.append(raw_io(opt))
    out = {"params": n, "losses": losses, "stats": stats, "step_s": step_s, "compute_s": compute_s,
           "fp32_params_grads_adamw_bytes": 16 * n,
           "params_grads_bytes": 2 * n * torch.empty((), dtype=dtype).element_size()}
    if a.optim == "offload":
        opt.synchronize()  # overlap_forward: the last step waits for a forward that will not come
    if a.raw_io and a.optim == "offload":
        out["raw_io_s"] = [raw_io(opt) for _ in range(2)]
    if a.raw_every:
        # raw_between_s[j] ran after step j * K: steps j*K+1 .. (j+1)*K lie between passes j and j+1
        out["raw_every"] = a.raw_every
        out["raw_between_s"] = raw_between
    peak = sampler.stop()
    out["peak_anon_above_base"] = peak["RssAnon"] - base.get("RssAnon", 0)
    out["peak_file_rss"] = peak["RssFile"]
    out["peak_cgroup_cache"] = peak["cache"]
    if a.save:
        import outlast

        t0 = time.perf_counter()
        outlast.save({"optim": opt}, a.save)
        out["save_s"] = time.perf_counter() - t0
        data = os.path.join(a.save, "data")
        out["save_written_bytes"] = sum(os.path.getsize(os.path.join(data, f)) for f in os.listdir(data))
        if a.drop_save:
            shutil.rmtree(a.save)
    if a.save_async:
        import outlast

        t0 = time.perf_counter()
        with outlast.Checkpointer(a.save_async) as ck:
            ck.save({"optim": opt}, a.steps)
            ck.wait()
            out["async_save_s"] = time.perf_counter() - t0
            out["async_saved_bytes"] = ck.metrics[-1].nbytes
            out["async_staged_bytes"] = sum(img.numel() for bufs in ck._pool._free for _, img in bufs.images)
    if a.optim == "offload":
        out["pool_bytes"] = opt.buffer_bytes
        out["bytes_per_step"] = opt.bytes_per_step
        out["direct"] = opt.files.direct
        opt.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
