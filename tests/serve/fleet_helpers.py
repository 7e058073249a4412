"""Helpers of the fleet tests: tiny random Llama checkpoints, real server processes on loopback, bounded waits."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import httpx
import torch

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")
TOKEN = "fleet-test-token"


def tiny_config():
    from outlast.serve.config import ModelConfig

    # The GGUF tokenizer's vocabulary, so the real tokenizer drives a tiny random model.
    return ModelConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, max_position=512, tie_word_embeddings=True, eos_token_ids=(2,), name="tiny")


def tiny_state(seed: int) -> dict:
    """Random weights under Hugging Face names; each seed gives other greedy outputs."""
    c = tiny_config()
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.5  # noqa: E731
    kv = c.num_kv_heads * c.head_dim
    sd = {"model.embed_tokens.weight": r(c.vocab_size, c.hidden_size), "model.norm.weight": torch.ones(c.hidden_size)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": torch.ones(c.hidden_size),
               p + "post_attention_layernorm.weight": torch.ones(c.hidden_size),
               p + "self_attn.q_proj.weight": r(c.hidden_size, c.hidden_size),
               p + "self_attn.k_proj.weight": r(kv, c.hidden_size), p + "self_attn.v_proj.weight": r(kv, c.hidden_size),
               p + "self_attn.o_proj.weight": r(c.hidden_size, c.hidden_size),
               p + "mlp.gate_proj.weight": r(c.intermediate_size, c.hidden_size),
               p + "mlp.up_proj.weight": r(c.intermediate_size, c.hidden_size),
               p + "mlp.down_proj.weight": r(c.hidden_size, c.intermediate_size)}
    return sd


def commit_step(run_dir: str, step: int, seed: int | None = None) -> str:
    """Commit a tiny model as ``step`` with outlast.Checkpointer, as a training run would."""
    import outlast

    with outlast.Checkpointer(run_dir) as ck:
        ck.save({"model": tiny_state(step if seed is None else seed), "serve_config": tiny_config().to_json()}, step)
    return ck.path_of(step)


def corrupt(step_dir: str) -> None:
    """Flip bytes in the middle of the step's data (manifest intact: it looks committed, checksums fail)."""
    data = os.path.join(step_dir, "data")
    f = os.path.join(data, sorted(os.listdir(data))[0])
    with open(f, "r+b") as fh:
        fh.seek(os.path.getsize(f) // 2)
        b = fh.read(64)
        fh.seek(os.path.getsize(f) // 2)
        fh.write(bytes(x ^ 0xFF for x in b))


def start(args: list[str], log_path: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
               OUTLAST_ADMIN_TOKEN=TOKEN)
    log = open(log_path, "wb")
    return subprocess.Popen([sys.executable, "-m", "outlast.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process group (a supervisor and its replicas), SIGKILL what is left after ``timeout``."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None, log_path: str | None = None):
    """Poll ``pred()`` (exceptions count as False) until truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}) while waiting for {what}:\n"
                                 + (open(log_path).read()[-4000:] if log_path else ""))
        try:
            v = pred()
            if v:
                return v
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                                 + (":\n" + open(log_path).read()[-4000:] if log_path else ""))
        time.sleep(0.1)


def assert_each_response_equals_its_step(run_dir, out, tokenizer, steps, prompts, max_tokens) -> None:
    """Every response in ``out`` ((prompt, text, fingerprint, ...) tuples) equals greedy decoding by
    a fresh engine started on the step its fingerprint names, and each step served some."""
    from outlast.serve import EngineConfig, LLMEngine, SamplingParams
    from outlast.serve.weights import load_weights

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for step in steps:
        eng = LLMEngine(*load_weights(os.path.join(str(run_dir), f"step-{step:08d}")), tokenizer, EngineConfig(num_blocks=64))
        want = {p: eng.tokenizer.decode(eng.generate([eng.tokenizer.encode(p)], params)[0]) for p in prompts}
        got = [(x[0], x[1]) for x in out if x[2] == f"step-{step}"]
        assert got and all(text == want[p] for p, text in got), (step, [x for x in got if x[1] != want[x[0]]][:3])


@contextlib.contextmanager
def streaming_completion(url: str, model: str, prompt: str, events: int = 3, max_tokens: int = 400):
    """A greedy streamed completion, entered once ``events`` data events have arrived; yields the
    line iterator (close it to disconnect). Keep the iterator referenced until the check that
    needs the request alive: a ``for`` loop left with ``break`` drops it, and closing that
    generator can close the response (a disconnect) before the check runs (seen once in CI)."""
    with httpx.stream("POST", url + "/v1/completions", timeout=60,
                      json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                            "ignore_eos": True, "stream": True}) as resp:
        lines = resp.iter_lines()
        got = 0
        while got < events:
            got += next(lines).startswith("data: ")
        yield lines
