"""Router overhead on its own: one tiny replica, ``outlast route`` in front of it, and a raw asyncio TCP pipe beside it.

The fleet bench's completion timings are dominated by the 135M engine (75-320 ms a request on a busy
host), so this bench serves a 2-layer random Llama (a few ms a request) with a small BPE tokenizer
trained on the spot, and sends the same requests, interleaved one by one over one keep-alive
``httpx`` client, to the replica directly, through the router, and through a 25-line asyncio pipe
that copies bytes without parsing HTTP (the floor any Python proxy can reach on this host). Reports
p50 of the per-pair differences for ``GET /v1/models`` and a 1-token completion, and the router's
CPU per request (its health checks included).

    python bench/router_overhead.py [--n 200]

Prints a table and one JSON line. Install ``httptools`` and ``uvloop`` (the serve extra) to see what
uvicorn does with a C parser; the table says which the router had.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "src")
sys.path.insert(0, SRC)
sys.path.insert(0, os.path.join(ROOT, "bench"))
from _common import stop_all  # noqa: E402

PIPE = r'''
import asyncio, socket, sys
BACK = int(sys.argv[2])
async def pipe(r, w):
    try:
        while (b := await r.read(65536)):
            w.write(b)
    except ConnectionError:
        pass
    finally:
        w.close()
async def handle(cr, cw):
    br, bw = await asyncio.open_connection("127.0.0.1", BACK)
    for w in (cw, bw):
        w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await asyncio.gather(pipe(cr, bw), pipe(br, cw))
async def main():
    async with await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1])) as srv:
        await srv.serve_forever()
asyncio.run(main())
'''


def tiny_checkpoint(work: str) -> tuple[str, str]:
    import torch

    import outlast
    from outlast.serve.config import ModelConfig
    from outlast.serve.demo import build_tokenizer
    from outlast.serve.demo_train import shakespeare_text

    tok = build_tokenizer(os.path.join(work, "tok"), shakespeare_text(200_000))
    c = ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    max_position=512, eos_token_ids=(0,), name="tiny")
    g = torch.Generator().manual_seed(0)
    kv = c.num_kv_heads * c.head_dim
    sd = {"model.embed_tokens.weight": torch.randn(c.vocab_size, c.hidden_size, generator=g),
          "model.norm.weight": torch.ones(c.hidden_size)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        for n, shape in (("input_layernorm", None), ("post_attention_layernorm", None),
                         ("self_attn.q_proj", (32, 32)), ("self_attn.k_proj", (kv, 32)), ("self_attn.v_proj", (kv, 32)),
                         ("self_attn.o_proj", (32, 32)), ("mlp.gate_proj", (64, 32)), ("mlp.up_proj", (64, 32)),
                         ("mlp.down_proj", (32, 64))):
            sd[p + n + ".weight"] = torch.ones(32) if shape is None else torch.randn(*shape, generator=g) * 0.5
    with outlast.Checkpointer(os.path.join(work, "run")) as ck:
        ck.save({"model": sd, "serve_config": c.to_json()}, 1)
    return ck.path_of(1), tok


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="request pairs per route")
    args = ap.parse_args()
    from outlast.serve.supervisor import free_port

    work = tempfile.mkdtemp(prefix="outlast-router-bench-")
    step, tok = tiny_checkpoint(work)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p))
    env.pop("OUTLAST_ADMIN_TOKEN", None)
    rp, rtp, pp = free_port(), free_port(), free_port()
    logs = {k: open(os.path.join(work, f"{k}.log"), "wb") for k in ("replica", "router", "pipe")}
    procs = [subprocess.Popen([sys.executable, "-m", "outlast.cli", "serve", step, "--tokenizer", tok, "--port", str(rp),
                               "--served-model-name", "m", "--kv-cache-gib", "0.01"], env=env, stdout=logs["replica"],
                              stderr=subprocess.STDOUT, start_new_session=True),
             subprocess.Popen([sys.executable, "-m", "outlast.cli", "route", "--backend", f"http://127.0.0.1:{rp}",
                               "--port", str(rtp)], env=env, stdout=logs["router"], stderr=subprocess.STDOUT,
                              start_new_session=True),
             subprocess.Popen([sys.executable, "-c", PIPE, str(pp), str(rp)], stdout=logs["pipe"],
                              stderr=subprocess.STDOUT, start_new_session=True)]
    urls = {"direct": f"http://127.0.0.1:{rp}", "router": f"http://127.0.0.1:{rtp}", "pipe": f"http://127.0.0.1:{pp}"}
    try:
        deadline = time.monotonic() + 180
        for u in (urls["direct"], urls["router"]):
            while True:
                try:
                    if httpx.get(u + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise SystemExit(f"the servers did not come up; logs in {work}")
                time.sleep(0.1)
        time.sleep(0.5)
        body = {"model": "m", "prompt": "The weather today is", "max_tokens": 1, "temperature": 0}
        res = {(route, via): [] for route in ("models", "completion") for via in urls}
        with httpx.Client(timeout=30) as c:
            def once(route: str, base: str) -> float:
                t = time.perf_counter()
                r = (c.get(base + "/v1/models") if route == "models"
                     else c.post(base + "/v1/completions", json=body))
                r.raise_for_status()
                return time.perf_counter() - t

            for _ in range(20):  # warm connections, the prefix cache and the router's pool
                for route in ("models", "completion"):
                    for base in urls.values():
                        once(route, base)
            cpu0, load0 = cpu_s(procs[1].pid), os.getloadavg()[0]
            for _ in range(args.n):
                for route in ("models", "completion"):
                    for via, base in urls.items():
                        res[(route, via)].append(once(route, base))
            cpu_ms = 1e3 * (cpu_s(procs[1].pid) - cpu0) / (2 * args.n)
    finally:
        stop_all(procs)
        for f in logs.values():
            f.close()
    shutil.rmtree(work, ignore_errors=True)  # kept (with the logs) only when the run failed
    load = (load0 + os.getloadavg()[0]) / 2
    fast = all(importlib.util.find_spec(m) is not None for m in ("httptools", "uvloop"))
    out = {"bench": "router_overhead", "n": args.n, "loadavg_1m": round(load, 2), "httptools_uvloop": fast,
           "router_cpu_ms_per_request": round(cpu_ms, 3)}
    print(f"router overhead: 1 tiny replica, {args.n} interleaved request pairs, load average {load:.1f} on "
          f"{os.cpu_count()} CPUs; uvicorn {'with httptools + uvloop' if fast else 'on h11 + asyncio'}")
    print(f"{'route':12} {'direct p50':>11} {'via router':>11} {'router +p50':>12} {'via pipe':>9} {'pipe +p50':>10}")
    for route in ("models", "completion"):
        d, r, p = (res[(route, v)] for v in ("direct", "router", "pipe"))
        row = {"direct_p50_ms": 1e3 * statistics.median(d), "router_p50_ms": 1e3 * statistics.median(r),
               "router_overhead_p50_ms": 1e3 * statistics.median([b - a for a, b in zip(d, r)]),
               "pipe_p50_ms": 1e3 * statistics.median(p),
               "pipe_overhead_p50_ms": 1e3 * statistics.median([b - a for a, b in zip(d, p)])}
        out[route] = {k: round(v, 3) for k, v in row.items()}
        print(f"{route:12} {row['direct_p50_ms']:9.2f}ms {row['router_p50_ms']:9.2f}ms "
              f"{row['router_overhead_p50_ms']:10.2f}ms {row['pipe_p50_ms']:7.2f}ms {row['pipe_overhead_p50_ms']:8.2f}ms")
    print(f"router CPU per request (health checks included): {cpu_ms:.2f} ms")
    out["targets"] = {"router_overhead_p50_le_1ms": out["models"]["router_overhead_p50_ms"] <= 1.0}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
