"""One server per data directory and per port: the lock, the early port
check and the bind without port reuse (the whole servers are in
tests/serving/test_local_server_isolation.py)."""

import asyncio
import os
import socket
import subprocess
import sys

import grpc
import pytest

from coordinator.server import GemmaServer
from coordinator.service_config import ServiceConfig
from coordinator.single_instance import (LOCK_FILE, NO_PORT_REUSE, AlreadyInUse, DataDirLock,
                                         listen, refuse_if_port_in_use)
from worker.worker_config import WorkerSpec


def test_the_data_directory_lock_is_exclusive_and_names_its_owner(tmp_path):
    data = tmp_path / "data"
    first = DataDirLock(str(data))  # creates the directory
    assert (data / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    with pytest.raises(AlreadyInUse) as refused:  # even within one process
        DataDirLock(str(data))
    assert str(refused.value).startswith(f"the data directory {data} is in use by another "
                                         f"gemma-serve (pid {os.getpid()})")
    assert (data / LOCK_FILE).read_text() == f"{os.getpid()}\n"  # the refusal changed nothing
    first.release()
    first.release()  # idempotent
    DataDirLock(str(data)).release()


def test_the_lock_of_another_process(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from coordinator.single_instance import "
         "DataDirLock; lock = DataDirLock(sys.argv[1]); print('held', flush=True); time.sleep(60)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(AlreadyInUse, match=f"pid {holder.pid}"):
            DataDirLock(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    DataDirLock(str(tmp_path)).release()  # the kernel dropped the dead holder's lock


def test_a_port_in_use_is_refused_early():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(AlreadyInUse, match=f"port {port} on 127.0.0.1 is in use"):
            refuse_if_port_in_use("127.0.0.1", port)
    refuse_if_port_in_use("127.0.0.1", port)  # free again
    refuse_if_port_in_use("127.0.0.1", 0)  # any free port: nothing to check


def test_a_second_grpc_server_cannot_bind_the_port():
    async def bind_twice():
        first = grpc.aio.server(options=[NO_PORT_REUSE])
        port = listen(first, "127.0.0.1", 0, None)
        await first.start()
        try:
            # Even a server that asks for port reuse: the first one did not.
            for options in ([NO_PORT_REUSE], []):
                with pytest.raises(AlreadyInUse, match=f"port {port} on 127.0.0.1 is in use"):
                    listen(grpc.aio.server(options=options), "127.0.0.1", port, None)
        finally:
            await first.stop(None)

    asyncio.run(bind_twice())


def test_a_refused_start_releases_the_data_directory(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        config = ServiceConfig(worker=WorkerSpec("default"), port=taken.getsockname()[1],
                               data_dir=str(tmp_path))
        with pytest.raises(AlreadyInUse, match="is in use"):  # before Ray or any worker
            asyncio.run(GemmaServer(config).start())
    DataDirLock(str(tmp_path)).release()
    assert os.listdir(tmp_path) == [LOCK_FILE]  # nothing else was created there
