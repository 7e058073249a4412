"""Training-thread stall of checkpointing: outlast.Checkpointer vs DCP async_save vs nothing.

A CPU training loop of a small transformer (about 226 MiB of parameters + AdamW state)
saves every ``--every`` steps. For each mode the script measures the loop's wall time
and, per save, the stall on the training thread:

* outlast: time inside ``Checkpointer.save()`` plus time its hooks blocked
  (``SaveMetrics.stall_s``);
* DCP: time inside ``async_save()`` plus time waiting for the previous save's future
  (DCP needs the previous one finished before the next starts) plus, where DCP stages
  asynchronously, the wait for staging before ``optimizer.step()``.

Modes run interleaved for ``--rounds`` rounds, each in a fresh process (so none inherits
another's background process, allocator caches or dirty pages), the order rotating from
round to round, so drift of a shared machine hits all of them alike. ``x none`` is the
median loop time over the median no-checkpoint loop time; ``x none/round`` the median of
each round's ratio. Prints a table and a final JSON line.

The machine's limit (mode ``rawio``): at each save point a background thread only writes
a page-aligned buffer of the state's size to a file with O_DIRECT and fsyncs it (no copy,
no checksum, no manifest, no consistency): what writing these bytes in the background
costs the loop on this machine, whatever does it. On the virtual machine this was written
on that cost is large: the hypervisor accounts a direct write of 240 MiB as ~25% steal
time and a concurrent matmul loop runs at 0.65x for the write's duration (a sleep of the
same length: 1.00x). ``share of floor`` is (mode - none) / (rawio - none).

``--cpu-shares N`` (root, cgroup v1 ``cpu`` or v2 ``cpu.weight``) runs the children in a
CPU cgroup weighted N against the default 1024, so other work on a shared host yields to
the benchmark (it still shares memory bandwidth and the disk).

    PYTHONPATH=src python bench/stall.py [--steps 40 --every 10 --rounds 1 --cpu-shares 262144]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn

import outlast


class Model(nn.Module):
    def __init__(self, vocab=2048, d=512, layers=6, ffn=2048, heads=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, ffn, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        return self.head(self.body(self.embed(x)))


def make(seed=0):
    torch.manual_seed(seed)
    model = Model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt


def train_step(model, opt, x, wait_before_step=None):
    logits = model(x[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    loss.backward()
    stall = wait_before_step() if wait_before_step else 0.0
    opt.step()
    opt.zero_grad(set_to_none=True)
    return stall


def pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run_none(model, opt, batches, every, root):
    t0 = time.perf_counter()
    for x in batches:
        train_step(model, opt, x)
    return time.perf_counter() - t0, []


def run_outlast(model, opt, batches, every, root):
    state = {"model": model, "optim": opt, "step": 0}
    ckpt = outlast.Checkpointer(os.path.join(root, "outlast"), keep_last=2)
    t0 = time.perf_counter()
    for i, x in enumerate(batches):
        train_step(model, opt, x)
        if i % every == every - 1:
            state["step"] = i
            ckpt.save(state, step=i)
    loop = time.perf_counter() - t0
    ckpt.close()
    return loop, [m.stall_s for m in ckpt.metrics], ckpt.metrics


def state_bytes(model, opt) -> int:
    """Bytes of the model's state dict plus the optimizer's state tensors (what a save writes)."""
    n = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return n + sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def run_rawio(model, opt, batches, every, root):
    import threading

    from outlast.storage.local import aligned_buffer, write_file_image

    nbytes = state_bytes(model, opt)
    img = aligned_buffer(nbytes)
    img.fill_(1)  # faulted in before the loop: the floor pays no allocation
    worker = None
    stalls = []
    t0 = time.perf_counter()
    for i, x in enumerate(batches):
        train_step(model, opt, x)
        if i % every == every - 1:
            t = time.perf_counter()
            if worker is not None:
                worker.join()  # one write in flight, as outlast's max_in_flight=1
            worker = threading.Thread(target=write_file_image, args=(os.path.join(root, f"raw-{i}"), img, nbytes))
            worker.start()
            stalls.append(time.perf_counter() - t)
    loop = time.perf_counter() - t0
    if worker is not None:
        worker.join()
    return loop, stalls


def dcp_options():
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    opts = {"async_checkpointer_type": AsyncCheckpointerType.PROCESS}
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        cuda = torch.cuda.is_available()
        # Pinned memory and asynchronous staging need CUDA; shared memory helps the
        # PROCESS checkpointer (the staged copy is handed over without another copy).
        opts["async_stager"] = DefaultStager(StagingOptions(cuda, True, cuda, cuda))
    except ImportError:
        pass
    return dcp, opts


def run_dcp(model, opt, batches, every, root):
    import torch.distributed as dist

    # DCP's PROCESS checkpointer needs a process group, even for one rank.
    store = dist.FileStore(os.path.join(root, "dcp-store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        return _run_dcp(model, opt, batches, every, root)
    finally:
        dist.destroy_process_group()


def _run_dcp(model, opt, batches, every, root):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    dcp, opts = dcp_options()
    stalls = []
    fut = None
    staging = None
    n = 0

    def wait_staging():
        nonlocal staging
        if staging is None:
            return 0.0
        t = time.perf_counter()
        staging.result()
        staging = None
        dt = time.perf_counter() - t
        stalls[-1] += dt
        return dt

    t0 = time.perf_counter()
    for i, x in enumerate(batches):
        train_step(model, opt, x, wait_before_step=wait_staging)
        if i % every == every - 1:
            t = time.perf_counter()
            if fut is not None:
                fut.result()
            msd, osd = get_state_dict(model, opt)
            r = dcp.async_save({"model": msd, "optim": osd, "step": i}, checkpoint_id=os.path.join(root, "dcp", f"step-{i}"), **opts)
            if hasattr(r, "upload_completion"):
                fut, staging = r.upload_completion, r.staging_completion
            else:
                fut = r
            stalls.append(time.perf_counter() - t)
            n += 1
    loop = time.perf_counter() - t0
    if fut is not None:
        fut.result()
    stager = opts.get("async_stager")
    return loop, stalls, stager


def child(args) -> dict:
    """Run one mode in this (fresh) process and return its measurements."""
    model, opt = make()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 2048, (args.batch, args.seq), generator=gen) for _ in range(args.steps)]
    for x in batches[:3]:  # warm up: allocate optimizer state, fault in memory
        train_step(model, opt, x)
    nbytes = state_bytes(model, opt)
    runners = {"none": run_none, "outlast": run_outlast, "dcp": run_dcp, "rawio": run_rawio}
    root = tempfile.mkdtemp(prefix="outlast-bench-", dir=args.dir)
    try:
        out = runners[args.child](model, opt, batches, args.every, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    res = {"mode": args.child, "loop_s": out[0], "stalls_s": out[1], "state_bytes": nbytes,
           "threads": torch.get_num_threads()}
    if args.child == "outlast":
        ms = out[2]
        res["stage_s"] = [m.stage_s for m in ms]
        res["persist_s"] = [m.persist_s for m in ms]
        res["blocked_s"] = [m.blocked_s for m in ms]
    if args.child == "dcp" and out[2] is not None:
        out[2].close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=33)
    ap.add_argument("--modes", default="none,rawio,outlast,dcp")
    ap.add_argument("--cpu-shares", type=int, default=0, help="run the children in a CPU cgroup of this weight (root)")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--settle", type=float, default=3.0, help="seconds of quiet between runs")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return

    # Every (round, mode) runs in a fresh process, so no mode inherits another's state
    # (DCP's background process, allocator caches, dirty pages), and the order of modes
    # rotates from round to round so none always runs right after another.
    modes = args.modes.split(",")
    enter = cpu_cgroup(args.cpu_shares) if args.cpu_shares else None
    loops: dict = {m: [] for m in modes}
    per_round: dict = {m: [] for m in modes}
    stalls: dict = {m: [] for m in modes}
    extra: dict = {}
    info: dict = {}
    for r in range(args.rounds):
        order = modes[r % len(modes):] + modes[: r % len(modes)]
        got = {}
        for mode in order:
            cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--steps", str(args.steps),
                   "--every", str(args.every), "--batch", str(args.batch), "--seq", str(args.seq)]
            if args.dir:
                cmd += ["--dir", args.dir]
            os.sync()  # let the previous run's writeback finish before this one starts
            time.sleep(args.settle)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, preexec_fn=enter)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"mode {mode} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            res = json.loads(lines[-1][len("RESULT "):])
            info = {"state_bytes": res["state_bytes"], "threads": res["threads"]}
            got[mode] = res
            loops[mode].append(res["loop_s"])
            stalls[mode] += res["stalls_s"]
            for k in ("stage_s", "persist_s", "blocked_s"):
                extra.setdefault(f"{mode}_{k}", []).extend(res.get(k, []))
            print(f"round {r} {mode:8s} loop {res['loop_s']:.2f} s  stalls(ms) "
                  f"{[round(x * 1e3, 1) for x in res['stalls_s']]}", file=sys.stderr)
        if "none" in got:
            for mode in modes:
                per_round[mode].append(got[mode]["loop_s"] / got["none"]["loop_s"])

    print(f"state: {info['state_bytes'] / 2**20:.0f} MiB (model + AdamW), torch {torch.__version__}, "
          f"{info['threads']} intra-op threads, {os.cpu_count()} cpus", file=sys.stderr)
    base = statistics.median(loops["none"]) if "none" in loops else None
    res: dict = {"state_mib": round(info["state_bytes"] / 2**20, 1), "steps": args.steps, "every": args.every,
                 "rounds": args.rounds, "step_s": round(base / args.steps, 4) if base else None}
    floor = statistics.median(loops["rawio"]) if "rawio" in loops else None
    print(f"\n{'mode':10s} {'loop s':>8s} {'x none':>7s} {'x none/round':>13s} {'share of floor':>15s} {'stall med ms':>13s} "
          f"{'stall p95 ms':>13s} {'saves':>6s}")
    for mode in modes:
        loop = statistics.median(loops[mode])
        st = stalls[mode]
        rel = loop / base if base else float("nan")
        rel_r = statistics.median(per_round[mode]) if per_round[mode] else float("nan")
        med = statistics.median(st) * 1e3 if st else 0.0
        p95 = pct(st, 0.95) * 1e3 if st else 0.0
        share = (loop - base) / (floor - base) if base and floor and floor > base else float("nan")
        print(f"{mode:10s} {loop:8.2f} {rel:7.3f} {rel_r:13.3f} {share:15.2f} {med:13.2f} {p95:13.2f} {len(st):6d}")
        res[mode] = {"loop_s": round(loop, 3), "rel_to_none": round(rel, 4), "share_of_rawio_floor": round(share, 3),
                     "rel_to_none_per_round": [round(x, 4) for x in per_round[mode]],
                     "stall_median_ms": round(med, 3), "stall_p95_ms": round(p95, 3), "saves": len(st)}
    for k, v in extra.items():
        if v:
            res[k.replace("_s", "_median_s")] = round(statistics.median(v), 4)
    if "outlast" in res and "dcp" in res and res["dcp"]["stall_median_ms"]:
        res["stall_ratio_outlast_vs_dcp"] = round(res["outlast"]["stall_median_ms"] / res["dcp"]["stall_median_ms"], 4)
    print(json.dumps(res))


def cpu_cgroup(shares: int):
    """A CPU cgroup weighted ``shares`` (v1 cpu.shares; v2 cpu.weight scaled to 1..10000) and a
    preexec function that moves a child into it."""
    v1 = "/sys/fs/cgroup/cpu"
    if os.path.isdir(v1):
        path, knob, value = os.path.join(v1, f"outlast-bench-{os.getpid()}"), "cpu.shares", shares
    else:
        path, knob, value = f"/sys/fs/cgroup/outlast-bench-{os.getpid()}", "cpu.weight", max(1, min(10000, shares * 100 // 1024))
    try:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, knob), "w") as f:
            f.write(str(value))
    except OSError as e:
        sys.exit(f"--cpu-shares needs root and a cgroup cpu controller: {e}")
    import atexit

    def remove() -> None:
        try:
            os.rmdir(path)  # empty once the children have exited
        except OSError:
            pass

    atexit.register(remove)

    def enter():
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    return enter


if __name__ == "__main__":
    main()
