"""``outlast serve --replicas N``: start N engine processes on loopback ports, keep them alive, route to them.

:class:`Supervisor` runs each replica as ``python -m outlast.cli serve ...`` (one process each, so
one crash takes one replica) and a monitor thread that restarts a replica whose process exited
(kill -9 included), on the same port, from the weights the fleet serves at that moment (the
router's current step when it follows a run directory). Replicas die with the supervisor
(``PR_SET_PDEATHSIG`` on Linux; ``close`` terminates them otherwise). The router runs in the
supervisor's own process (:mod:`outlast.serve.router`); its health checks take a dead replica out
of rotation and bring the restarted one back.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

__all__ = ["Supervisor", "free_port", "replica_argv"]

log = logging.getLogger("outlast.serve")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Supervisor:
    """N replica processes, restarted when they exit.

    Args:
        command: ``command(port, model)`` -> the replica's argv.
        ports: one loopback port per replica.
        model: ``model()`` -> what a (re)started replica serves.
        env: the replicas' environment.
        restart_delay: seconds before restarting a replica (doubling while it keeps dying within 10 s
            of its start, up to 30 s).

    Example:
        >>> sup = Supervisor(lambda port, m: [sys.executable, "-m", "outlast.cli", "serve", m, "--port", str(port)],
        ...                  [8001, 8002], lambda: "model.gguf").start()
        >>> sup.close()
    """

    def __init__(self, command: Callable[[int, str], list[str]], ports: list[int], model: Callable[[], str], *,
                 env: dict | None = None, restart_delay: float = 0.5):
        self.command = command
        self.ports = list(ports)
        self.model = model
        self.env = env
        self.restart_delay = restart_delay
        self.procs: list[subprocess.Popen | None] = [None] * len(ports)
        self.started_at = [0.0] * len(ports)
        self.restarts = [0] * len(ports)
        self._delay = [restart_delay] * len(ports)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._monitor, name="outlast-supervisor", daemon=True)

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def pids(self) -> list[int | None]:
        return [p.pid if p is not None else None for p in self.procs]

    def _spawn(self, i: int) -> None:
        argv = self.command(self.ports[i], self.model())
        self.procs[i] = subprocess.Popen(argv, env=self.env, preexec_fn=_die_with_parent if os.name == "posix" else None)
        self.started_at[i] = time.monotonic()
        log.warning("outlast serve: replica %d (pid %d) starting on port %d", i, self.procs[i].pid, self.ports[i])

    def start(self) -> "Supervisor":
        for i in range(len(self.ports)):
            self._spawn(i)
        self._thread.start()
        return self

    def _monitor(self) -> None:
        while not self._stop.wait(0.1):
            for i, p in enumerate(self.procs):
                if p is None or p.poll() is None or self._stop.is_set():
                    continue
                lived = time.monotonic() - self.started_at[i]
                self._delay[i] = self.restart_delay if lived > 10 else min(30.0, self._delay[i] * 2)
                log.warning("outlast serve: replica %d (pid %d) exited with status %s after %.1f s; restarting in %.1f s",
                            i, p.pid, p.returncode, lived, self._delay[i])
                if self._stop.wait(self._delay[i]):
                    return
                self.restarts[i] += 1
                self._spawn(i)

    def close(self, timeout: float = 20.0) -> None:
        """Stop restarting, send SIGTERM to every replica, SIGKILL those still alive after ``timeout``."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in self.procs:
            if p is None:
                continue
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def replica_argv(model: str, port: int, options: list[str]) -> list[str]:
    """The argv of one replica: ``python -m outlast.cli serve MODEL --host 127.0.0.1 --port PORT ...``."""
    return [sys.executable, "-m", "outlast.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port), *options]
