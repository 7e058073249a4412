"""The training half of ``outlast demo serve``: a small Llama trained in the background, checkpointed as it goes.

The reference trainer's model (:mod:`outlast.train.model`) is GPT-shaped and byte-level, and the
serving runtime runs the Llama family, so this process trains a ``transformers``
``LlamaForCausalLM`` (RMSNorm, RoPE, grouped-query attention, SwiGLU: what ``outlast serve``
runs) on the bundled Shakespeare text, tokenized with the demo's own small BPE tokenizer. Every
``--every`` steps it commits the weights with :class:`outlast.Checkpointer`, exactly as a training
run would, together with the ``serve_config`` that lets ``outlast serve`` read the step without
``--config``. Each commit is appended to ``RUN_DIR/commits.jsonl`` (step, wall-clock time, loss),
which the demo uses to measure how long a commit takes to reach the clients.

Run as ``python -m outlast.serve.demo_train RUN_DIR --tokenizer DIR --seconds S --every K``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time

import torch

__all__ = ["MODEL_SHAPE", "main"]

# ~0.6M parameters: a step is ~0.1 s on one CPU core, so a commit every 40 steps is every few seconds.
MODEL_SHAPE = {"hidden_size": 96, "intermediate_size": 256, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
               "max_position": 512}
COMMITS = "commits.jsonl"


def shakespeare_text(max_chars: int | None = None) -> str:
    """The bundled Shakespeare corpus (the trainer's data), as one string."""
    path = os.path.join(os.path.dirname(__file__), "..", "train", "data", "shakespeare.jsonl.gz")
    parts, n = [], 0
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)["text"]
            parts.append(t)
            n += len(t)
            if max_chars is not None and n >= max_chars:
                break
    return "\n".join(parts)[:max_chars]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m outlast.serve.demo_train")
    ap.add_argument("run_dir")
    ap.add_argument("--tokenizer", required=True, help="the demo's tokenizer directory")
    ap.add_argument("--seconds", type=float, default=40.0, help="train for this long, then commit a last step")
    ap.add_argument("--every", type=int, default=40, help="commit every this many steps")
    ap.add_argument("--max-steps", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start-when", default=None,
                    help="after committing step 0, wait (up to 300 s) for this file before training: the demo "
                         "creates it once the server answers, so every later commit is served")
    a = ap.parse_args(argv)

    torch.set_num_threads(1)  # the server and the client share the host
    import outlast
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from .config import ModelConfig

    tok = PreTrainedTokenizerFast.from_pretrained(a.tokenizer)
    ids = torch.tensor(tok.encode(shakespeare_text(2_000_000), add_special_tokens=False), dtype=torch.long)
    s = MODEL_SHAPE
    serve_cfg = ModelConfig(vocab_size=len(tok), hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                            num_layers=s["num_layers"], num_heads=s["num_heads"], num_kv_heads=s["num_kv_heads"],
                            max_position=s["max_position"], rms_norm_eps=1e-5, rope_theta=10000.0,
                            tie_word_embeddings=True, eos_token_ids=(tok.eos_token_id,), name="demo-llama")
    torch.manual_seed(a.seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=serve_cfg.vocab_size, hidden_size=serve_cfg.hidden_size,
        intermediate_size=serve_cfg.intermediate_size, num_hidden_layers=serve_cfg.num_layers,
        num_attention_heads=serve_cfg.num_heads, num_key_value_heads=serve_cfg.num_kv_heads,
        max_position_embeddings=serve_cfg.max_position, rms_norm_eps=serve_cfg.rms_norm_eps,
        rope_theta=serve_cfg.rope_theta, tie_word_embeddings=True, eos_token_id=tok.eos_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(a.seed)
    batch, seq = 8, 128
    log = open(os.path.join(a.run_dir, COMMITS), "a")

    def commit(ck, step: int, loss: float) -> None:
        # HF names; the tied lm_head is the embedding (the runtime reads embed_tokens when tied).
        sd = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        ck.save({"model": sd, "serve_config": serve_cfg.to_json()}, step)
        ck.wait()  # committed: the time logged is after the manifest landed
        log.write(json.dumps({"step": step, "t": time.time(), "loss": loss}) + "\n")
        log.flush()

    with outlast.Checkpointer(a.run_dir, keep_last=4) as ck:
        commit(ck, 0, float("nan"))  # the random start: the server has something to serve at once
        if a.start_when is not None:
            deadline = time.monotonic() + 300
            while not os.path.exists(a.start_when):
                if time.monotonic() > deadline:
                    raise SystemExit(f"demo_train: {a.start_when} did not appear within 300 s")
                time.sleep(0.05)
        t_end = time.monotonic() + a.seconds
        step, loss = 0, float("nan")
        while step < a.max_steps and time.monotonic() < t_end:
            starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=gen)
            x = torch.stack([ids[i:i + seq] for i in starts.tolist()])
            out = model(input_ids=x, labels=x)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss = float(out.loss)
            if step % a.every == 0:
                commit(ck, step, loss)
        if step % a.every:
            commit(ck, step, loss)
    log.close()


if __name__ == "__main__":
    main()
