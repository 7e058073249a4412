"""The ``outlast`` command line: inspect, verify and list checkpoints (and more).

Exit codes: 0 success; 1 the checkpoint is bad (verify found problems, load failed);
2 usage errors (click's default); 3 the path holds no (complete) checkpoint.
Every command takes ``--json`` for scripts.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import click

from . import __version__
from .errors import CheckpointError, CheckpointNotFoundError, IncompleteCheckpointError

EXIT_BAD = 1
EXIT_NOT_FOUND = 3


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return f"{n} B"


def fail(err: Exception, as_json: bool) -> None:
    code = EXIT_NOT_FOUND if isinstance(err, (CheckpointNotFoundError, IncompleteCheckpointError)) else EXIT_BAD
    if as_json:
        click.echo(json.dumps({"ok": False, "error": type(err).__name__, "message": str(err)}))
    else:
        click.echo(f"error: {err}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="outlast")
def main() -> None:
    """outlast: checkpoints that survive crashes and reshard across GPU counts."""


@main.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--depth", type=int, default=None, help="Collapse names below this many dotted levels.")
def inspect(path: str, as_json: bool, depth: int | None) -> None:
    """Show the tensors and values in the checkpoint at PATH."""
    from .reader import open_manifest

    try:
        m = open_manifest(path)
    except CheckpointError as e:
        fail(e, as_json)
        return
    if as_json:
        click.echo(json.dumps({
            "ok": True, "path": path, "step": m.step, "created": m.created, "library": m.library,
            "world_size": m.world_size, "nbytes": m.nbytes, "files": m.files,
            "tensors": {k: {"dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes, "chunks": t.nchunks} for k, t in m.tensors.items()},
            "plain": {k: p.value for k, p in m.plain.items()},
        }))
        return
    click.echo(f"checkpoint {path}")
    click.echo(f"  step {m.step}   created {m.created}   by {m.library}   saved by {m.world_size} process(es)")
    rows: dict[str, list] = {}
    for fqn, t in m.tensors.items():
        name = ".".join(fqn.split(".")[:depth]) if depth else fqn
        r = rows.setdefault(name, [t.dtype, list(t.shape), 0, 0])
        r[2] += t.nbytes
        r[3] += 1
        if r[3] > 1:
            r[0], r[1] = "", f"{r[3]} tensors"
    width = max([len(n) for n in rows] + [4])
    click.echo(f"  {'name'.ljust(width)}  {'dtype':6} {'shape':>20} {'bytes':>10}")
    for name, (dt, shape, nb, _) in rows.items():
        click.echo(f"  {name.ljust(width)}  {dt:6} {str(shape):>20} {human_bytes(nb):>10}")
    if m.plain:
        click.echo("  values:")
        for k, p in m.plain.items():
            text = json.dumps(p.value)
            click.echo(f"    {k} = {text if len(text) <= 80 else text[:77] + '...'}")
    click.echo(f"  total: {len(m.tensors)} tensors, {human_bytes(m.nbytes)} in {len(m.files)} file(s)")


@main.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def verify(path: str, as_json: bool, quiet: bool) -> None:
    """Check every file and checksum of the checkpoint at PATH.

    Exits 0 if all is well, 1 naming every bad file and tensor, 3 if PATH holds no
    complete checkpoint.
    """
    from .convert.core import progress_bar
    from .reader import CheckpointReader

    try:
        reader = CheckpointReader(path, check_files=False)  # verify lists every problem
    except CheckpointError as e:
        fail(e, as_json)
        return
    with reader:
        total = sum(c.nbytes for t in reader.manifest.tensors.values() for c in t.chunks)
        bar = progress_bar(total, "verify", False if (quiet or as_json) else None)
        problems = reader.verify(progress=bar.update)
        bar.close()
    if as_json:
        click.echo(json.dumps({"ok": not problems, "path": path, "problems": problems, "nbytes": total}))
    elif problems:
        click.echo(f"{path}: {len(problems)} problem(s):", err=True)
        for p in problems:
            click.echo(f"  {p}", err=True)
    else:
        click.echo(f"{path}: ok ({len(reader.manifest.tensors)} tensors, {human_bytes(total)} checked)")
    sys.exit(EXIT_BAD if problems else 0)


@main.command(name="ls")
@click.argument("directory", type=click.Path(), default=".")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--shm-dir", default="/dev/shm", show_default=True,
              help="Where the memory tier keeps snapshots (listed with the checkpoints of their run).")
def ls_cmd(directory: str, as_json: bool, shm_dir: str) -> None:
    """List the checkpoints under DIRECTORY with step, size and status, and the memory
    snapshots (in shared memory) of the run that saves there."""

    from .reader import list_checkpoints

    if not os.path.isdir(directory):
        fail(CheckpointNotFoundError(f"{directory} is not a directory"), as_json)
        return
    rows = list_checkpoints(directory)
    memory = _memory_jobs(shm_dir, directory)
    if as_json:
        click.echo(json.dumps({"ok": True, "directory": directory, "checkpoints": rows, "memory": memory}))
        return
    if not rows and not memory:
        click.echo(f"no checkpoints under {directory}")
        return
    if rows:
        width = max(len(r["name"]) for r in rows)
        click.echo(f"{'name'.ljust(width)}  {'step':>8}  {'size':>10}  status")
        for r in rows:
            step = "-" if r["step"] is None else str(r["step"])
            click.echo(f"{r['name'].ljust(width)}  {step:>8}  {human_bytes(r['nbytes']):>10}  {r['status']}")
    for job in memory:
        _echo_memory_job(job)


def _memory_jobs(shm_dir: str, directory: str | None) -> list[dict]:
    from .memtier import list_jobs

    jobs = list_jobs(shm_dir)
    if directory is not None:
        want = os.path.abspath(directory)
        jobs = [j for j in jobs if j["info"].get("directory") == want]
    return [{**j, "steps": {str(k): v for k, v in j["steps"].items()}} for j in jobs]


def _echo_memory_job(job: dict) -> None:
    info = job["info"]
    click.echo(f"memory snapshots of job {job['job_id']} ({job['path']}, {human_bytes(job['bytes'])}, "
               f"{'running' if job['alive'] else 'no live rank'}, {info.get('redundancy', '?')}, "
               f"{info.get('world_size', '?')} ranks / {info.get('ranks_per_node', '?')} per node):")
    if not job["steps"]:
        click.echo("  (none)")
    for step, pieces in job["steps"].items():
        click.echo(f"  step {step:>8}  {len(pieces)} piece(s): {', '.join(pieces)}")


@main.group(name="shm")
def shm_group() -> None:
    """The memory tier's snapshots in shared memory."""


@shm_group.command(name="ls")
@click.option("--shm-dir", default="/dev/shm", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def shm_ls(shm_dir: str, as_json: bool) -> None:
    """List every job's memory snapshots."""
    jobs = _memory_jobs(shm_dir, None)
    if as_json:
        click.echo(json.dumps({"ok": True, "jobs": jobs}))
        return
    if not jobs:
        click.echo(f"no outlast memory snapshots under {shm_dir}")
    for job in jobs:
        _echo_memory_job(job)


@shm_group.command(name="clean")
@click.option("--shm-dir", default="/dev/shm", show_default=True)
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def shm_clean(shm_dir: str, dry_run: bool, as_json: bool) -> None:
    """Remove the snapshots of jobs none of whose ranks is still running (on this machine)."""
    from .memtier import clean_dead

    gone = clean_dead(shm_dir, dry_run=dry_run)
    if as_json:
        click.echo(json.dumps({"ok": True, "removed": gone, "dry_run": dry_run}))
        return
    verb = "would remove" if dry_run else "removed"
    click.echo(f"{verb} {len(gone)} dead job(s)" + "".join(f"\n  {p}" for p in gone))


# ---------------------------------------------------------------- convert / merge


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"2GiB"`` -> 2 * 2**30, ``"123"`` -> 123 (bytes)."""
    t = text.strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for u, mult in units.items():
        if t.endswith(u):
            num = t[: -len(u)]
            break
    else:
        num, mult = t, 1
    try:
        value = float(num)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size such as 5GB, 500MiB or 1000000") from None
    if value <= 0:
        raise click.BadParameter(f"size must be positive, got {text!r}")
    return int(value * mult)


def _run_and_report(as_json: bool, fn, describe) -> None:
    try:
        result = fn()
    except CheckpointError as e:
        fail(e, as_json)
        return
    except (ValueError, NotImplementedError) as e:
        if as_json:
            click.echo(json.dumps({"ok": False, "error": type(e).__name__, "message": str(e)}))
        else:
            click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_BAD)
    payload, text = describe(result)
    click.echo(json.dumps({"ok": True, **payload}) if as_json else text)


@main.command(name="convert")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--from", "src_format", required=True,
              type=click.Choice(["outlast", "hf", "dcp", "torch", "deepspeed", "gguf"]), help="Format of SRC.")
@click.option("--to", "dst_format", required=True, type=click.Choice(["outlast", "hf", "dcp"]), help="Format of DST.")
@click.option("--prefix", default=None, help="Sub-tree to export (e.g. model), or to nest an import under.")
@click.option("--max-shard-size", default=None, help="Bytes per output file, e.g. 5GB or 500MiB (HF default 5GB).")
@click.option("--tag", default=None, help="DeepSpeed tag to read (default: the 'latest' file).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output at DST.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def convert_cmd(src: str, dst: str, src_format: str, dst_format: str, prefix: str | None,
                max_shard_size: str | None, tag: str | None, overwrite: bool, as_json: bool, quiet: bool) -> None:
    """Convert the checkpoint SRC into DST, streaming tensor by tensor.

    \b
    Examples:
      outlast convert ckpt/step-1000 hf-out --from outlast --to hf --prefix model
      outlast convert Llama-dir ckpt/imported --from hf --to outlast --prefix model
      outlast convert dcp-dir ckpt/from-dcp --from dcp --to outlast
      outlast convert model.gguf ckpt/model --from gguf --to outlast   # dequantised, for outlast serve
    """
    from .convert import convert_checkpoint

    size = parse_size(max_shard_size) if max_shard_size else None
    progress = False if (quiet or as_json) else None

    def describe(r):
        text = (f"{src} ({src_format}) -> {dst} ({dst_format}): {r.tensors} tensors, "
                f"{human_bytes(r.nbytes)} in {len(r.files)} file(s)")
        if r.plain_dropped:
            text += f"\n  note: {len(r.plain_dropped)} plain value(s) not representable in {dst_format}: " + \
                ", ".join(r.plain_dropped[:8])
        return r.to_json(), text

    if src_format == "gguf":
        from .convert.gguf import convert_gguf

        if dst_format != "outlast":
            raise click.BadParameter("a GGUF file converts only --to outlast", param_hint="--to")
        _run_and_report(as_json, lambda: convert_gguf(src, dst, prefix=prefix, overwrite=overwrite), describe)
        return
    _run_and_report(as_json, lambda: convert_checkpoint(src, dst, src_format=src_format, dst_format=dst_format, prefix=prefix,
                                                        overwrite=overwrite, max_shard_size=size, progress=progress, tag=tag),
                    describe)


@main.command(name="serve")
@click.argument("model", required=False, type=click.Path(exists=True))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--max-num-seqs", default=32, show_default=True, type=click.IntRange(1), help="Most sequences at once.")
@click.option("--token-budget", default=512, show_default=True, type=click.IntRange(1), help="Most tokens per engine step.")
@click.option("--kv-cache-gib", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Memory for the KV block pool.")
@click.option("--kv-disk", "kv_disk", default=None, type=click.Path(file_okay=False),
              help="Directory of the disk tier for evicted prefix blocks (off by default).")
@click.option("--kv-disk-gib", default=4.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--max-model-len", default=None, type=click.IntRange(1), help="Context length (default the model's).")
@click.option("--max-waiting", default=256, show_default=True, type=click.IntRange(1),
              help="Queue bound; beyond it requests get HTTP 429.")
@click.option("--no-prefix-caching", is_flag=True, help="Turn prefix caching off.")
@click.option("--blas-threads", default=1, show_default=True, type=click.IntRange(1),
              help="Threads of the GEMMs (numpy's BLAS); more helps only on an otherwise idle host.")
@click.option("--compute-threads", default=None, type=click.IntRange(1, 2),
              help="Threads a step runs on: 2 splits every GEMM and the attention with a worker that sleeps "
                   "rather than spins [default: 2 when 2 CPUs are usable; with --replicas, the CPUs shared out].")
@click.option("--gemv-threads", default=1, show_default=True, type=click.IntRange(1, 2),
              help="BLAS threads of a lone decode's GEMVs; 2 is faster only on an otherwise idle host.")
@click.option("--gemm-backend", default=None, type=click.Choice(["panel", "onednn", "numpy", "torch"]),
              help="The layers' GEMMs: panel (outlast's compiled GEMM on weights packed once in panels, one more "
                   "copy of them in memory; one compute thread only), onednn (weights packed once, one more copy), "
                   "numpy (OpenBLAS) or torch (MKL) [default: panel for fp32 on one compute thread, as in the "
                   "engine process, where the kernels build; else onednn where torch has it; else torch on Intel "
                   "CPUs, numpy elsewhere].")
@click.option("--dtype", "weight_dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16"]),
              help="The dtype the GEMMs read the weights in. bfloat16 (oneDNN only) halves the bytes a decode reads "
                   "and doubles the GEMMs' rate on CPUs with AVX512-BF16 or AMX; norms, attention and the KV "
                   "cache stay fp32, and the logits move by bf16's rounding.")
@click.option("--engine-process/--in-process", "engine_process", default=None,
              help="Run the engine in a process of its own (no GIL shared with HTTP; steps on torch's OpenMP "
                   "threads and a lone decode's GEMVs on two OpenBLAS threads, unless --compute-threads is "
                   "given), or in the server's process [default: its own process, except with --watch or "
                   "--replicas, which need it in the server's].")
@click.option("--prefix", default="model", show_default=True, help="The model's sub-tree in an outlast checkpoint.")
@click.option("--config", "config_path", default=None, type=click.Path(exists=True),
              help="config.json for an outlast checkpoint without serve_config.")
@click.option("--tokenizer", default=None, type=click.Path(exists=True),
              help="GGUF file or HF directory with the tokenizer (default MODEL).")
@click.option("--served-model-name", default=None, help="The model id clients use (default MODEL's file name).")
@click.option("--watch", "watch", default=None, type=click.Path(file_okay=False),
              help="A Checkpointer run directory: serve each newly committed, verified step (hot reload).")
@click.option("--no-follow", is_flag=True, help="With --watch: reload only through the admin endpoint.")
@click.option("--reload-io", default="direct", show_default=True, type=click.Choice(["direct", "buffered"]),
              help="With --watch: read new steps with O_DIRECT (around the page cache, which a step the "
              "Checkpointer just wrote is not in) or through the page cache.")
@click.option("--no-reload-buffers", is_flag=True, help="With --watch: free a reload's memory after each swap "
              "(default: keep two more copies of the weights mapped, which makes reloads several times faster).")
@click.option("--admin-token", default=None, help="Bearer token of the /admin routes (default $OUTLAST_ADMIN_TOKEN; "
              "none: admin off).")
@click.option("--replicas", default=None, type=click.IntRange(1),
              help="Run N engine processes behind a router on --port (restarted if they die).")
@click.option("--policy", default="cache_aware", show_default=True,
              type=click.Choice(["cache_aware", "least_tokens", "round_robin"]), help="With --replicas: routing policy.")
def serve_cmd(model: str | None, host: str, port: int, max_num_seqs: int, token_budget: int, kv_cache_gib: float,
              kv_disk: str | None, kv_disk_gib: float, max_model_len: int | None, max_waiting: int,
              no_prefix_caching: bool, blas_threads: int, compute_threads: int | None, gemv_threads: int,
              gemm_backend: str | None, weight_dtype: str, engine_process: bool | None,
              prefix: str, config_path: str | None, tokenizer: str | None,
              served_model_name: str | None, watch: str | None, no_follow: bool, reload_io: str,
              no_reload_buffers: bool,
              admin_token: str | None,
              replicas: int | None, policy: str) -> None:
    """Serve MODEL (a GGUF file, HF directory or outlast checkpoint) over an OpenAI-compatible API.

    With --watch RUN_DIR, MODEL may be left out (the newest committed step serves first) and each
    newly committed step is hot-loaded. With --replicas N, N engine processes run behind a router.

    \b
    Examples:
      outlast serve SmolLM2-135M-Instruct.Q4_1.gguf --port 8000
      outlast serve ckpt/step-00001000 --tokenizer model.gguf --kv-disk /tmp/kv
      outlast serve --watch runs/exp1 --tokenizer model.gguf --replicas 2 --admin-token $TOKEN
    """

    from .serve import EngineConfig, ServeError, load_engine
    from .serve.admin import token_from
    from .serve.loop import EngineLoop
    from .serve.model import _usable_cpus
    from .serve.reload import committed_steps, step_of
    from .serve.server import serve

    if model is None:
        steps = committed_steps(watch) if watch else {}
        if not steps:
            click.echo("error: give MODEL, or --watch RUN_DIR holding at least one committed step-* checkpoint",
                       err=True)
            sys.exit(EXIT_BAD)
        model = steps[max(steps)]
    start_step = None
    if watch and os.path.dirname(os.path.abspath(model)) == os.path.abspath(watch):
        start_step = step_of(model)
    name = served_model_name or os.path.basename(os.path.normpath(watch if watch and start_step is not None else model))
    if engine_process and (watch or replicas is not None):
        click.echo("error: --engine-process does not work with --watch (hot reload swaps weights in this process) "
                   "or --replicas; drop one of them", err=True)
        sys.exit(EXIT_BAD)
    if engine_process is None:
        engine_process = not watch and replicas is None
    if replicas is not None:
        _serve_replicas(model, name, host, port, replicas, policy, watch, start_step, token_from(admin_token),
                        [("--max-num-seqs", max_num_seqs), ("--token-budget", token_budget),
                         ("--kv-cache-gib", kv_cache_gib), ("--kv-disk-gib", kv_disk_gib),
                         ("--max-model-len", max_model_len), ("--max-waiting", max_waiting),
                         ("--blas-threads", blas_threads),
                         ("--compute-threads", compute_threads or max(1, min(2, _usable_cpus() // replicas))),
                         ("--gemv-threads", gemv_threads), ("--gemm-backend", gemm_backend),
                         ("--dtype", weight_dtype),
                         ("--prefix", prefix), ("--config", config_path),
                         ("--tokenizer", tokenizer), ("--served-model-name", name)],
                        kv_disk, no_prefix_caching, no_reload_buffers, reload_io)
        return
    try:
        ec = EngineConfig(max_num_seqs=max_num_seqs, token_budget=token_budget, kv_cache_gib=kv_cache_gib,
                          kv_disk_dir=kv_disk, kv_disk_gib=kv_disk_gib, max_model_len=max_model_len,
                          max_waiting=max_waiting, enable_prefix_caching=not no_prefix_caching,
                          blas_threads=blas_threads, compute_threads=compute_threads, gemv_blas_threads=gemv_threads,
                          gemm_backend=gemm_backend, weight_dtype=weight_dtype)
        if engine_process:
            from .serve.proc import ProcessEngineLoop

            loop = ProcessEngineLoop(model, ec, prefix=prefix, config=config_path, tokenizer=tokenizer)
            loop.start()
        else:
            loop = EngineLoop(load_engine(model, ec, prefix=prefix, config=config_path, tokenizer=tokenizer))
            loop.start()
        engine = loop.engine
    except (ServeError, CheckpointError, ValueError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_BAD)
    weights = None
    if watch:
        from .serve.reload import WeightsManager

        weights = WeightsManager(loop, watch, prefix=prefix, config=config_path, follow=not no_follow,
                                 step=start_step, keep_buffers=not no_reload_buffers,
                                 direct_io=reload_io == "direct").start()
    click.echo(f"serving {name} ({engine.weights_version}) on http://{host}:{port}/v1 ({engine.kv.num_blocks} KV "
               f"blocks of {engine.kv.block_size} tokens, context {engine.max_model_len}, {weight_dtype} weights)",
               err=True)
    # uvicorn shuts down on SIGTERM, then raises the signal again once its own handler is gone: with
    # the default action the process would die there, before closing the engine (its process too).
    terminated = False

    def on_term(signum, frame):
        raise _Terminated

    signal.signal(signal.SIGTERM, on_term)
    try:
        serve(loop, name, host, port, weights=weights, admin_token=token_from(admin_token))
    except _Terminated:
        terminated = True
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM while closing ends the process
        if weights is not None:
            weights.close()
        loop.close()
    if terminated:  # the exit status still says SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)


class _Terminated(BaseException):
    """SIGTERM, raised where ``outlast serve`` can still close its engine."""


def _serve_replicas(model: str, name: str, host: str, port: int, n: int, policy: str, watch: str | None,
                    start_step: int | None, admin_token: str | None, options: list, kv_disk: str | None,
                    no_prefix_caching: bool, no_reload_buffers: bool = False, reload_io: str = "direct") -> None:
    import secrets

    from .serve.policy import RoutingConfig
    from .serve.router import Router
    from .serve.router_app import run_router
    from .serve.supervisor import Supervisor, free_port, replica_argv

    opts = [x for k, v in options if v is not None for x in (k, str(v))] + ["--in-process"]
    if no_prefix_caching:
        opts.append("--no-prefix-caching")
    if watch:
        opts += ["--watch", watch, "--no-follow"]  # the router rolls reloads across replicas, one at a time
        opts += ["--reload-io", reload_io] + (["--no-reload-buffers"] if no_reload_buffers else [])
    internal = secrets.token_urlsafe(24)  # the replicas' admin token: only the router knows it
    env = dict(os.environ, OUTLAST_ADMIN_TOKEN=internal)
    ports = [free_port() for _ in range(n)]
    router = Router([f"http://127.0.0.1:{p}" for p in ports], RoutingConfig(policy=policy), admin_token=admin_token,
                    backend_token=internal, run_dir=watch, step=start_step)

    def argv(p: int, m: str) -> list[str]:
        extra = ["--kv-disk", os.path.join(kv_disk, f"replica-{p}")] if kv_disk else []
        return replica_argv(m, p, opts + extra)

    sup = Supervisor(argv, ports, lambda: router.current_path() or model, env=env).start()
    router.supervisor = sup
    click.echo(f"routing {name} ({policy}) on http://{host}:{port}/v1 to {n} replicas on ports "
               f"{', '.join(map(str, ports))}", err=True)
    try:
        run_router(router, host, port)
    finally:
        sup.close()


@main.command(name="route")
@click.option("--backend", "backends", multiple=True, required=True,
              help="A replica's base URL (repeat): http://127.0.0.1:8001")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--policy", default="cache_aware", show_default=True,
              type=click.Choice(["cache_aware", "least_tokens", "round_robin"]))
@click.option("--watch", default=None, type=click.Path(file_okay=False),
              help="Follow this Checkpointer run directory, reloading the replicas one at a time "
                   "(run them with --watch RUN_DIR --no-follow).")
@click.option("--admin-token", default=None, help="Bearer token of the router's /admin routes "
              "(default $OUTLAST_ADMIN_TOKEN).")
@click.option("--backend-token", default=None, help="Bearer token of the replicas' /admin routes "
              "(default $OUTLAST_BACKEND_TOKEN, else the admin token).")
@click.option("--balance-abs", default=16, show_default=True, type=click.IntRange(0),
              help="cache_aware: route to the least loaded replica instead of the one holding the prompt's "
              "prefix when the busiest has more than this many requests above the idlest (and 1.5x as many).")
@click.option("--health-interval", default=0.2, show_default=True, type=click.FloatRange(min=0.01),
              help="Seconds between health checks of each replica.")
def route_cmd(backends: tuple[str, ...], host: str, port: int, policy: str, watch: str | None,
              admin_token: str | None, backend_token: str | None, balance_abs: int, health_interval: float) -> None:
    """Route OpenAI-API requests across running `outlast serve` replicas.

    \b
    Example:
      outlast route --backend http://127.0.0.1:8001 --backend http://127.0.0.1:8002 --port 8000
    """

    from .serve.admin import token_from
    from .serve.policy import RoutingConfig
    from .serve.router import Router
    from .serve.router_app import run_router

    token = token_from(admin_token)
    router = Router(list(backends), RoutingConfig(policy=policy, balance_abs=balance_abs), admin_token=token,
                    backend_token=backend_token or os.environ.get("OUTLAST_BACKEND_TOKEN") or token,
                    run_dir=watch, health_interval=health_interval)
    click.echo(f"routing ({policy}) on http://{host}:{port}/v1 to {', '.join(backends)}", err=True)
    run_router(router, host, port)


@main.command(name="merge")
@click.argument("dst", type=click.Path())
@click.argument("srcs", nargs=-1, required=True, type=click.Path())
@click.option("--method", type=click.Choice(["mean", "weighted", "lawa", "ema"]), default="mean", show_default=True)
@click.option("--weights", default=None, help="Comma-separated weights, one per SRC (--method weighted).")
@click.option("--decay", type=float, default=None, help="EMA decay in [0, 1) (--method ema).")
@click.option("--last-k", type=int, default=None, help="How many newest checkpoints LAWA averages (default all).")
@click.option("--overwrite", is_flag=True, help="Replace a committed checkpoint at DST.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def merge_cmd(dst: str, srcs: tuple[str, ...], method: str, weights: str | None, decay: float | None,
              last_k: int | None, overwrite: bool, as_json: bool, quiet: bool) -> None:
    """Average the outlast checkpoints SRC... into DST (float tensors; the rest from the newest).

    \b
    Examples:
      outlast merge ckpt/avg ckpt/step-800 ckpt/step-900 ckpt/step-1000
      outlast merge ckpt/lawa ckpt/step-* --method lawa --last-k 5
      outlast merge ckpt/ema ckpt/step-* --method ema --decay 0.9
    """

    from .merge import merge_checkpoints

    try:
        w = [float(x) for x in weights.split(",")] if weights else None
    except ValueError:
        raise click.BadParameter(f"--weights must be comma-separated numbers, got {weights!r}") from None
    progress = False if (quiet or as_json) else None

    def describe(m):
        info = m.extra.get("merged_from", {})
        payload = {"dst": dst, "step": m.step, "tensors": len(m.tensors), "nbytes": m.nbytes, **info}
        used = ", ".join(f"{os.path.basename(p)}*{wi:.4g}" for p, wi in zip(info.get("sources", []), info.get("weights", [])))
        return payload, f"merged ({method}) -> {dst}: {len(m.tensors)} tensors, {human_bytes(m.nbytes)}; {used}"

    _run_and_report(as_json, lambda: merge_checkpoints(list(srcs), dst, method=method, weights=w, decay=decay, last_k=last_k,
                                                       overwrite=overwrite, progress=progress), describe)


# ---------------------------------------------------------------------------- training


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="TOML training config (see examples/shakespeare_tiny.toml).")
def train(config_path: str) -> None:
    """Train (or resume) the run described by a TOML config.

    Launch with torchrun for several ranks, e.g.
    ``torchrun --standalone --nproc-per-node 2 -m outlast.cli train --config FILE``;
    a plain ``outlast train --config FILE`` runs one process. Run the same command again
    after a crash, on any number of ranks, and it resumes from the latest committed
    checkpoint.
    """
    from .train.config import ConfigError, load_config
    from .train.loop import train as run_training

    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    try:
        run_training(cfg)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    except CheckpointError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_BAD)
    if "RANK" in os.environ:
        # A torchrun rank whose run is complete (last checkpoint committed, process group
        # destroyed) leaves without finalizing the interpreter: during teardown a gloo
        # worker thread still releasing a collective's tensors can abort the rank
        # (pytorch/pytorch#190489), and torchrun would report -- or, with
        # --max-restarts, restart -- a run that had finished.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@main.group(invoke_without_command=True)
@click.option("--out", type=click.Path(file_okay=False), default="outlast-demo", show_default=True,
              help="Folder for everything the demo writes (config, run, logs, loss.png, summary.json).")
@click.option("--quick", is_flag=True, help="A smaller model and fewer steps (under a minute; for CI).")
@click.option("--timeout", "timeout_s", type=float, default=900.0, show_default=True,
              help="Give up after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.pass_context
def demo(ctx: click.Context, out: str, quick: bool, timeout_s: float, as_json: bool) -> None:
    """Train on 2 ranks, SIGKILL one mid-run, resume on 1 rank from the latest checkpoint.

    Ends with what the crash cost (steps lost, time to resume, stall per save, bytes
    written) and a plot of the loss curve, OUT/loss.png. Needs matplotlib
    (pip install 'outlast[demo]').

    `outlast demo serve` is the serving demo: a model served while it trains.
    """
    if ctx.invoked_subcommand is not None:
        return
    try:
        import matplotlib  # noqa: F401  - fail before training, not after
    except ImportError:
        raise click.UsageError("outlast demo draws its plot with matplotlib: pip install 'outlast[demo]'") from None
    from .train.demo import DemoError, format_summary, run_demo

    try:
        summary = run_demo(out, quick=quick, timeout_s=timeout_s,
                           echo=(lambda m: click.echo(m, err=True)) if as_json else click.echo)
    except DemoError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_BAD)
    click.echo(json.dumps(summary) if as_json else format_summary(summary))


@demo.command(name="serve")
@click.option("--out", type=click.Path(file_okay=False), default="outlast-demo-serve", show_default=True,
              help="Folder for everything the demo writes (tokenizer, run, logs, serve.png, summary.json).")
@click.option("--train-seconds", type=click.FloatRange(min=1), default=35.0, show_default=True,
              help="How long the model trains (the demo takes ~20 s more).")
@click.option("--every", type=click.IntRange(1), default=40, show_default=True,
              help="Commit a checkpoint every this many training steps.")
@click.option("--timeout", "timeout_s", type=float, default=180.0, show_default=True,
              help="Give up after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
def demo_serve(out: str, train_seconds: float, every: int, timeout_s: float, as_json: bool) -> None:
    """Train a small Llama in the background and serve it with --watch while it trains.

    Two clients keep sending completions; each response names the checkpoint step that computed
    it, and the summary shows the served step advancing as checkpoints commit, with the time from
    each commit to its first response. Writes OUT/serve.png (throughput and served step over
    time). Needs matplotlib and the serve extra (pip install 'outlast[demo,serve]').
    """
    try:
        import matplotlib  # noqa: F401  - fail before training, not after
    except ImportError:
        raise click.UsageError("outlast demo serve draws its plot with matplotlib: pip install 'outlast[demo]'") from None
    from .serve.demo import ServeDemoError, format_serve_summary, run_serve_demo

    try:
        summary = run_serve_demo(out, train_seconds=train_seconds, every=every, timeout_s=timeout_s,
                                 echo=(lambda m: click.echo(m, err=True)) if as_json else click.echo)
    except ServeDemoError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(EXIT_BAD)
    click.echo(json.dumps(summary) if as_json else format_serve_summary(summary))


if __name__ == "__main__":
    main()
