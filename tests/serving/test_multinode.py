"""Two Ray nodes on loopback (`ray start --head` and `ray start --address`),
a coordinator joining them with `--ray-address`, one worker on each node."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from coordinator.client import GemmaClient

BIN = pathlib.Path(sys.executable).parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, env, **kwargs):
    return subprocess.Popen(args, env=env, start_new_session=True, text=True, **kwargs)


def stop(process):
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


@pytest.mark.slow
def test_two_node_cluster(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled",
           "GEMMA_SERVE_CACHE": str(tmp_path / "cache")}
    env.pop("XLA_FLAGS", None)  # workers get their own devices
    port = free_port()
    common = ["--block", "--num-cpus=2", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
    processes = []
    try:
        processes.append(start([BIN / "ray", "start", "--head", f"--port={port}",
                                "--include-dashboard=false", *common], env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(5)
        processes.append(start([BIN / "ray", "start", f"--address=127.0.0.1:{port}", *common],
                               env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(5)
        serve = start([BIN / "gemma-serve", "--ray-address", f"127.0.0.1:{port}",
                       "--workers", "2", "--mesh", "1x1", "--port", "0",
                       "--data-dir", str(tmp_path / "data")], env,
                      stdout=subprocess.PIPE, stderr=open(tmp_path / "serve.log", "w"))
        processes.append(serve)
        ready = serve.stdout.readline()  # blocks until the ready line (or exit)
        assert "gemma-serve ready on 127.0.0.1:" in ready, (tmp_path / "serve.log").read_text()
        assert f"ray=127.0.0.1:{port}" in ready and "RANDOM WEIGHTS" in ready
        address = ready.split(" ready on ")[1].split()[0]
        with GemmaClient(address) as client:
            info = client.model_info(timeout=30)
            nodes = {w["node_id"] for w in info["workers"]}
            assert len(info["workers"]) == 2 and len(nodes) == 2, info["workers"]
            served_by = set()
            for _ in range(4):  # idle workers take turns: both nodes serve
                result = client.forward(texts=["across two nodes"], pooling="mean", timeout=60)
                assert np.isfinite(result.hidden_states[0][0]).all()
                served_by.add(result.worker_id)
            assert served_by == {"worker-0", "worker-1"}, served_by
    finally:
        for process in reversed(processes):
            stop(process)
