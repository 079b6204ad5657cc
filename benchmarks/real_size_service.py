"""The service cases of real_size.py: `gemma-serve` as a user starts it.

`serve_session` starts `gemma-serve --preset <dir> --workers 1 --mesh 1x1
--port 0 --data-dir <dir> --dtype <dtype>` as a subprocess (its own process
group, its own private local Ray, auth off, metrics off, per-request log
lines off), times the wait for its ready line, then sends closed-loop load
from this process: C clients, each an `AsyncGemmaClient` (one channel,
coroutines on one event loop) sending `requests` requests back to back, each
one sequence of `length` random token ids, layers [-1], mean pooling (tiny
answers: the measure is the forward, not the transfer). Every request's
latency counts, from the first one after the ready line on: a compilation
after ready shows as a slow request. The worker's pid comes from
GetModelInfo; its resident memory from /proc/<pid>/status. Then SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from proc_memory import memory_status  # benchmarks/, beside this file

# Variables that would change what the service does, or which cache it uses,
# relative to a user's plain start.
_SCRUBBED_ENV = ("XLA_FLAGS", "KERAS_BACKEND", "JAX_PLATFORMS", "JAX_COMPILATION_CACHE_DIR",
                 "GEMMA_SERVE_API_KEYS", "GEMMA_SERVE_API_KEY", "PJRT_NPROC")


def gemma_serve_command() -> str:
    beside = pathlib.Path(sys.executable).parent / "gemma-serve"
    return str(beside) if beside.exists() else (shutil.which("gemma-serve") or "gemma-serve")


class Server:
    """A running `gemma-serve`; `ready_s` is Popen to the ready line."""

    def __init__(self, preset, data_dir, dtype, gpus, log_path, timeout_s, cpus=None):
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
        env.update(RAY_AUTH_MODE="disabled", GEMMA_SERVE_LOG_LEVEL="WARNING")
        command = [gemma_serve_command(), "--preset", str(preset), "--workers", "1",
                   "--mesh", "1x1", "--host", "127.0.0.1", "--port", "0",
                   "--data-dir", str(data_dir), "--metrics-port", "-1", "--dtype", dtype]
        if gpus:
            command.append("--gpus")
        if cpus:
            command += ["--cpus-per-worker", str(cpus)]
        self.command = command
        self.log_path = log_path
        self._log = open(log_path, "w")
        started = time.perf_counter()
        self.process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                        stderr=self._log, text=True, start_new_session=True)
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, name="serve-stdout", daemon=True).start()
        try:
            ready = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            ready = None
        if not ready or " ready on " not in ready:
            self.kill()
            tail = pathlib.Path(log_path).read_text()[-3000:]
            raise RuntimeError(f"gemma-serve did not become ready within {timeout_s:.0f}s "
                               f"(stdout: {ready!r}); {log_path} ends:\n{tail}")
        self.ready_s = time.perf_counter() - started
        self.ready_line = ready
        self.address = ready.split(" ready on ")[1].split()[0]

    def _pump(self):  # keeps reading stdout so the pipe never fills
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def stop(self, grace_s: float = 120.0) -> float:
        """SIGTERM, wait; SIGKILL to its process group if it does not exit.
        Returns the seconds it took."""
        sent = time.perf_counter()
        try:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.kill()
        self._log.close()
        return time.perf_counter() - sent

    def kill(self):
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


async def _pass(clients, requests_each, length, vocabulary_size, seed):
    """Every client sends `requests_each` requests back to back, all starting
    together. Returns (latencies in seconds, in the order they finished; the
    seconds from the pass's start at which each was sent; wall seconds from
    the first send to the last answer)."""
    sequences = [np.random.default_rng([seed, i]).integers(
        0, vocabulary_size, (requests_each, length)).tolist() for i in range(len(clients))]
    finished, sent = [], []
    start = time.perf_counter()

    async def work(client, rows):
        for ids in rows:
            t0 = time.perf_counter()
            await client.forward(token_ids=[ids], layers=[-1], pooling="mean", timeout=3600)
            finished.append(time.perf_counter() - t0)
            sent.append(t0 - start)

    async with asyncio.TaskGroup() as group:
        for client, rows in zip(clients, sequences):
            group.create_task(work(client, rows))
    return finished, sent, time.perf_counter() - start


def serve_session(preset, data_dir, dtype, *, gpus, log_path, clients, requests_each, length,
                  vocabulary_size, seed, timeout_s, progress=print, cpus=None,
                  largest=None) -> dict:
    """Starts the service, runs one pass per entry of `clients` (concurrency),
    then, with `largest` = (rows, tokens), one request of that many
    sequences (the largest bucket), and stops it. Returns ready time, the
    passes (latencies, wall, rates) and the worker's memory at ready and
    after each pass."""
    from coordinator.async_client import AsyncGemmaClient

    server = Server(preset, data_dir, dtype, gpus, log_path, timeout_s, cpus)
    progress(f"  ready in {server.ready_s:.1f}s: {server.ready_line}")
    loop = asyncio.new_event_loop()
    channels = []
    try:
        async def connect():  # a grpc.aio channel belongs to the loop it is made on
            return [AsyncGemmaClient(server.address) for _ in range(max(clients))]

        channels = loop.run_until_complete(connect())
        # Connect every channel (GetModelInfo, no forward) before timing.
        async def ask_all():
            return await asyncio.gather(*(c.model_info(timeout=600) for c in channels))

        infos = loop.run_until_complete(ask_all())
        worker = infos[0]["workers"][0]
        pid = int(worker["pid"])
        session = {"ready_s": server.ready_s, "ready_line": server.ready_line,
                   "command": server.command, "worker_pid": pid,
                   "compiled_at_ready": int(worker.get("compiled_functions", 0)),
                   "worker_mem_ready": memory_status(pid),
                   "coordinator_mem_ready": memory_status(server.process.pid), "passes": []}
        for count in clients:
            latencies, sent, wall = loop.run_until_complete(
                _pass(channels[:count], requests_each, length, vocabulary_size,
                      seed + count))
            info = loop.run_until_complete(channels[0].model_info(timeout=600))["workers"][0]
            session["passes"].append({
                "clients": count, "requests": len(latencies), "latencies": latencies,
                "sent_at_s": sent,
                "wall_s": wall, "tokens_per_s": len(latencies) * length / wall,
                "batches_run": int(info.get("batches_run", 0)),
                "compiled_functions": int(info.get("compiled_functions", 0)),
                "worker_mem": memory_status(pid)})
            progress(f"  {count} clients: {len(latencies)} requests in {wall:.1f}s, "
                     f"p50 {1e3 * float(np.median(latencies)):.0f} ms, "
                     f"max {1e3 * max(latencies):.0f} ms")
        if largest:  # one request that fills the largest bucket: the activation peak
            rows, tokens = largest
            ids = np.random.default_rng([seed, 99]).integers(
                0, vocabulary_size, (rows, tokens)).tolist()

            async def fill():
                return await channels[0].forward(token_ids=ids, layers=[-1], pooling="mean",
                                                 timeout=timeout_s)

            t0 = time.perf_counter()
            loop.run_until_complete(fill())
            session["largest"] = {"shape": [rows, tokens], "seconds": time.perf_counter() - t0,
                                  "worker_mem": memory_status(pid)}
            progress(f"  largest bucket {rows}x{tokens}: {session['largest']['seconds']:.1f}s")
        session["coordinator_mem_end"] = memory_status(server.process.pid)
    finally:
        for channel in channels:
            loop.run_until_complete(channel.close())
        loop.close()
        session_stop = server.stop()
    session["stop_s"] = session_stop
    return session
