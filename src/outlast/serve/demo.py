"""``outlast demo serve``: a model in training, served while it trains, its served step advancing.

Three processes on loopback, all started here with timeouts:

1. **train** (:mod:`outlast.serve.demo_train`): a small Llama trained on the bundled Shakespeare
   text, committing a checkpoint with :class:`outlast.Checkpointer` every few seconds (step 0 at
   once; the training itself starts when the server answers, so every later commit is served);
2. **serve**: ``outlast serve --watch RUN_DIR``, which hot-loads each newly committed, verified step
   between engine steps;
3. **clients**: two threads of the official ``openai`` client sending greedy completions, bounded in
   count and time, each response recording the step that computed it (``system_fingerprint``).

When training ends and its last step serves, the demo writes ``serve.png`` (throughput and served
step over time, with each commit marked), ``summary.json`` and ``requests.jsonl`` under ``--out``
and returns the summary: steps committed and served, commit -> first response latency per step,
requests sent and failed, and one completion per served step so the model visibly learns.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

__all__ = ["ServeDemoError", "run_serve_demo", "format_serve_summary", "plot_serve", "build_tokenizer"]

OWNED = ("tokenizer", "run", "logs", "serve.png", "summary.json", "requests.jsonl")
PROMPTS = ["ROMEO:\n", "First Citizen:\nWe are", "KING HENRY:\nNow, my lords,", "To be, or not", "HAMLET:\n",
           "O, what a", "JULIET:\nMy love", "Enter"]
MODEL_NAME = "demo-llama"
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class ServeDemoError(RuntimeError):
    """The serving demo could not do what it promised (a process failed, nothing was served in time)."""


def build_tokenizer(out_dir: str, text: str, vocab_size: int = 512) -> str:
    """Train a byte-level BPE tokenizer on ``text`` and write it as a Hugging Face tokenizer directory.

    A 512-token vocabulary keeps the embedding small (the demo's model is ~0.6M parameters) and
    loads in well under a second, unlike a large GGUF vocabulary.

    Example:
        >>> build_tokenizer("out/tokenizer", shakespeare_text(1_000_000))
        'out/tokenizer'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                   "model_max_length": 512, "chat_template": CHAT_TEMPLATE}, f)
    return out_dir


def _prepare_out(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    foreign = sorted(set(os.listdir(out)) - set(OWNED))
    if foreign:
        raise ServeDemoError(f"{out} holds files the demo did not write ({', '.join(foreign[:5])}); "
                             "pass an empty or new --out directory")
    for name in OWNED:  # a previous run's results: start afresh
        p = os.path.join(out, name)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)


def _spawn(args: list[str], log_path: str) -> subprocess.Popen:
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p),
               OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env.pop("OUTLAST_ADMIN_TOKEN", None)
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def _stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-n:]
    except OSError:
        return ""


def _client(base_url: str, prompts: list[str], stop: threading.Event, records: list, lock: threading.Lock,
            max_requests: int, max_tokens: int) -> None:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=30.0, max_retries=0)
    i = 0
    while not stop.is_set() and i < max_requests:
        prompt = prompts[i % len(prompts)]
        i += 1
        t0 = time.time()
        rec = {"t0": t0, "prompt": prompt}
        try:
            r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0)
            rec |= {"t": time.time(), "ok": True, "step": int(r.system_fingerprint.removeprefix("step-")),
                    "tokens": r.usage.completion_tokens, "text": r.choices[0].text}
        except (openai.OpenAIError, ValueError, AttributeError) as e:
            rec |= {"t": time.time(), "ok": False, "error": f"{type(e).__name__}: {e}"}
        with lock:
            records.append(rec)


def run_serve_demo(out: str, *, train_seconds: float = 35.0, every: int = 40, clients: int = 2,
                   max_tokens: int = 24, timeout_s: float = 180.0,
                   echo: Callable[[str], None] = print) -> dict:
    """Train, serve while training, and measure what the clients saw. See the module docstring.

    Args:
        out: folder for everything the demo writes.
        train_seconds: how long the model trains (the demo takes ~15-25 s more).
        every: commit a checkpoint every this many training steps.
        clients: client threads sending completions.
        max_tokens: tokens per completion.
        timeout_s: give up (and stop every process) after this many seconds.
        echo: where progress lines go.

    Returns:
        The summary (also written to ``out/summary.json``).

    Raises:
        ServeDemoError: a process failed or nothing new was served before the deadline.
    """
    import httpx

    from .demo_train import COMMITS, shakespeare_text
    from .reload import committed_steps
    from .supervisor import free_port

    deadline = time.monotonic() + timeout_s
    _prepare_out(out)
    run_dir, logs = os.path.join(out, "run"), os.path.join(out, "logs")
    os.makedirs(run_dir)
    os.makedirs(logs)
    t_start = time.time()
    tok_dir = build_tokenizer(os.path.join(out, "tokenizer"), shakespeare_text(1_000_000))
    echo(f"tokenizer: byte-level BPE, 512 tokens -> {tok_dir}")
    train_log, serve_log = os.path.join(logs, "train.log"), os.path.join(logs, "serve.log")
    go = os.path.join(run_dir, "serving")  # the trainer trains once this exists: every later commit is served
    trainer = _spawn(["-m", "outlast.serve.demo_train", run_dir, "--tokenizer", tok_dir,
                      "--seconds", str(train_seconds), "--every", str(every), "--start-when", go], train_log)
    server = None
    stop = threading.Event()
    threads: list[threading.Thread] = []
    records: list[dict] = []
    lock = threading.Lock()

    def check(proc: subprocess.Popen, what: str, log: str) -> None:
        if proc.poll() is not None and (proc is server or proc.returncode != 0):
            raise ServeDemoError(f"the {what} exited with {proc.returncode}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise ServeDemoError(f"timed out after {timeout_s:.0f} s; the {what}'s log ends:\n{_tail(log)}")

    try:
        echo(f"training a Llama ({train_seconds:.0f} s, a checkpoint every {every} steps) in {run_dir}")
        while not committed_steps(run_dir):
            check(trainer, "trainer", train_log)
            time.sleep(0.1)
        port = free_port()
        server = _spawn(["-m", "outlast.cli", "serve", "--watch", run_dir, "--tokenizer", tok_dir, "--port", str(port),
                         "--served-model-name", MODEL_NAME, "--kv-cache-gib", "0.05", "--max-num-seqs", "8"],
                        serve_log)
        base = f"http://127.0.0.1:{port}"
        while True:
            check(server, "server", serve_log)
            try:
                if httpx.get(base + "/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        echo(f"serving on {base}/v1 with --watch {run_dir}; {clients} clients sending greedy completions")
        t_clients = time.time()
        for k in range(clients):
            th = threading.Thread(target=_client, args=(base + "/v1", PROMPTS[k::clients] if clients <= 2 else PROMPTS,
                                                        stop, records, lock, 5000, max_tokens), daemon=True)
            th.start()
            threads.append(th)
        open(go, "w").close()
        shown = -1
        while True:
            with lock:
                served = max((r["step"] for r in records if r.get("ok")), default=-1)
            if served > shown:
                echo(f"  t={time.time() - t_start:5.1f} s  serving step {served}")
                shown = served
            if trainer.poll() is not None:
                if trainer.returncode != 0:
                    raise ServeDemoError(f"the trainer exited with {trainer.returncode}:\n{_tail(train_log)}")
                last = max(committed_steps(run_dir))
                if served >= last:
                    break
            check(server, "server", serve_log)
            time.sleep(0.2)
    finally:
        stop.set()
        for th in threads:
            th.join(60)
        for p in (trainer, server):
            if p is not None:
                _stop(p)

    commits = []
    with open(os.path.join(run_dir, COMMITS)) as f:
        for line in f:
            commits.append(json.loads(line))
    summary = summarize(records, commits, t_clients, t_start)
    with open(os.path.join(out, "requests.jsonl"), "w") as f:
        for r in sorted(records, key=lambda r: r["t"]):
            f.write(json.dumps(r) + "\n")
    summary["plot"] = plot_serve(records, commits, t_clients, os.path.join(out, "serve.png"))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def summarize(records: list[dict], commits: list[dict], t_clients: float, t_start: float) -> dict:
    """Per committed step: when it committed, when its first response came back, and that response."""
    ok = sorted((r for r in records if r["ok"]), key=lambda r: r["t"])
    first: dict[int, dict] = {}
    for r in ok:
        first.setdefault(r["step"], r)
    steps = []
    for c in commits:
        r = first.get(c["step"])
        steps.append({"step": c["step"], "loss": None if c["loss"] != c["loss"] else round(c["loss"], 3),
                      "committed_at_s": round(c["t"] - t_clients, 2),
                      "served": r is not None,
                      # the first response computed by this step, from the commit (before the clients
                      # started, from their start: the server was not up yet)
                      "commit_to_first_response_s": None if r is None else round(r["t"] - max(c["t"], t_clients), 2),
                      "sample": None if r is None else r["prompt"] + r["text"]})
    span = max((r["t"] for r in ok), default=t_clients) - t_clients
    lat = [s["commit_to_first_response_s"] for s in steps if s["served"] and s["committed_at_s"] > 0]
    return {"seconds": round(time.time() - t_start, 1), "requests": len(records),
            "failed": sum(not r["ok"] for r in records),
            "tokens": sum(r["tokens"] for r in ok), "client_seconds": round(span, 1),
            "tokens_per_s": round(sum(r["tokens"] for r in ok) / span, 1) if span > 0 else 0.0,
            "steps_committed": [c["step"] for c in commits], "steps_served": sorted(first),
            "commit_to_first_response_s_median": sorted(lat)[len(lat) // 2] if lat else None,
            "steps": steps}


def plot_serve(records: list[dict], commits: list[dict], t0: float, path: str) -> str:
    """Throughput (completion tokens/s in 2 s bins) and the served step over time, commits marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = sorted((r for r in records if r["ok"]), key=lambda r: r["t"])
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    if ok:
        end = ok[-1]["t"] - t0
        width = 2.0
        nbins = max(1, int(end // width) + 1)
        tok = [0.0] * nbins
        for r in ok:
            tok[min(nbins - 1, int((r["t"] - t0) // width))] += r["tokens"]
        ax1.bar([i * width for i in range(nbins)], [v / width for v in tok], width=width * 0.9, align="edge")
        ax2.step([r["t"] - t0 for r in ok], [r["step"] for r in ok], where="post", label="served step (responses)")
    ax1.set_ylabel("completion tokens / s")
    ax1.set_title("outlast serve --watch: a model served while it trains")
    cs = [c for c in commits if c["t"] >= t0 - 60]
    ax2.scatter([max(0.0, c["t"] - t0) for c in cs], [c["step"] for c in cs], marker="x", color="C3",
                label="checkpoint committed")
    ax2.set_xlabel("seconds since the clients started")
    ax2.set_ylabel("training step")
    ax2.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_serve_summary(s: dict) -> str:
    """The summary as the lines the CLI prints."""
    lines = [f"outlast demo serve: {s['requests']} requests ({s['failed']} failed), {s['tokens']} tokens in "
             f"{s['client_seconds']} s ({s['tokens_per_s']} tokens/s); {s['seconds']} s in all",
             f"  steps committed {s['steps_committed']}",
             f"  steps served    {s['steps_served']}",
             f"  commit -> first response served by it: median {s['commit_to_first_response_s_median']} s",
             "  step   loss  commit->served  first completion"]
    for st in s["steps"]:
        lat = "-" if st["commit_to_first_response_s"] is None else f"{st['commit_to_first_response_s']:.2f} s"
        loss = "-" if st["loss"] is None else f"{st['loss']:.3f}"
        sample = "(no client saw it: a newer step served first)" if not st["served"] else repr(st["sample"])[:60]
        lines.append(f"  {st['step']:>5} {loss:>6} {lat:>14}  {sample}")
    lines.append(f"  plot: {s['plot']}")
    return "\n".join(lines)
