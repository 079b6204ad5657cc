"""A `gemma-serve` process with a Ray of its own (no --ray-address):
nothing in its process tree listens beyond loopback, its Ray refuses
callers without its token, and a second server on its data directory or
its port refuses to start, touching nothing of the first one's.

Not the test session's Ray: this server starts and authenticates its own.
"""

import os
import pathlib
import signal
import socket
import stat
import subprocess
import sys

import grpc
import numpy as np
import pytest

from service_support import shared_compilation_cache
from coordinator.client import GemmaClient

BIN = pathlib.Path(sys.executable).parent
FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "gemma1_tiny"
KEY = "acme-key-0123456789"
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def serve_command(data_dir, port=0):
    return [BIN / "gemma-serve", "--preset", str(FIXTURE), "--workers", "1", "--mesh", "1x1",
            "--port", str(port), "--metrics-port", "0", "--data-dir", str(data_dir),
            "--length-buckets", "16,64", "--batch-buckets", "1,4", "--ray-num-cpus", "2",
            *shared_compilation_cache()]


def serve_env():
    # RAY_AUTH_MODE=disabled comes from the session's Ray (conftest); the
    # server must turn token auth on regardless.
    env = {**os.environ, "GEMMA_SERVE_API_KEYS": f"acme={KEY}", "RAY_AUTH_MODE": "disabled"}
    env.pop("XLA_FLAGS", None)
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("local-server")
    log = folder / "serve.log"
    process = subprocess.Popen(serve_command(folder / "data"), env=serve_env(),
                               stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
                               start_new_session=True)
    ready = process.stdout.readline()
    assert "gemma-serve ready on" in ready, log.read_text()[-3000:]
    assert "ray=local" in ready
    address = ready.split(" ready on ")[1].split()[0]
    yield process, address, folder
    # The coordinator alone: it stops its Ray itself (Ray's processes, in
    # its process group, would otherwise die first and stall its shutdown).
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(60)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever outlived it
        except ProcessLookupError:
            pass


def process_tree(pid):
    """`pid` and all its descendants."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue  # gone meanwhile
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], ()))
    return tree


def _ip(hex_address, family):
    raw = bytes.fromhex(hex_address)
    # /proc/net/tcp{,6} print each 32-bit word in host (little-endian) order.
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(family, raw)


def listening_sockets(pid):
    """(pid, command, ip, port) of every listening TCP socket that a process
    of `pid`'s tree holds open, read from /proc."""
    found = []
    for member in process_tree(pid):
        try:
            inodes = set()
            for fd in os.listdir(f"/proc/{member}/fd"):
                try:
                    target = os.readlink(f"/proc/{member}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:["):-1])
            with open(f"/proc/{member}/cmdline") as handle:
                command = handle.read().replace("\0", " ")[:120]
            for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
                with open(f"/proc/{member}/net/{table}") as handle:
                    for line in handle.readlines()[1:]:
                        fields = line.split()
                        if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                            hex_ip, hex_port = fields[1].split(":")
                            found.append((member, command, _ip(hex_ip, family),
                                          int(hex_port, 16)))
        except OSError:
            continue  # a process that ended while we looked
    return found


def test_every_listening_socket_is_on_loopback(server):
    process, address, _ = server
    sockets = listening_sockets(process.pid)
    commands = " ".join(command for _, command, _, _ in sockets)
    # The measurement covers Ray's processes, not only the coordinator's.
    assert "gcs_server" in commands and "raylet" in commands, sockets
    assert int(address.rsplit(":", 1)[1]) in {port for _, _, _, port in sockets}
    exposed = [row for row in sockets if row[2] not in LOOPBACK]
    assert not exposed, f"listening beyond loopback: {exposed}"
    with GemmaClient(address, api_key=KEY) as client:  # and the service works
        assert np.isfinite(client.forward(token_ids=[[1, 2, 3]]).hidden_states[0][0]).all()


def test_ray_refuses_callers_without_its_token(server):
    from ray.core.generated import gcs_service_pb2 as gcs
    from ray.core.generated import gcs_service_pb2_grpc as gcs_grpc

    process, _, folder = server
    (gcs_pid, _, _, gcs_port), = [row for row in listening_sockets(process.pid)
                                  if "gcs_server" in row[1]]
    with open(f"/proc/{gcs_pid}/environ") as handle:
        environ = dict(item.split("=", 1) for item in handle.read().split("\0") if "=" in item)
    assert environ["RAY_AUTH_MODE"] == "token"
    assert "RAY_AUTH_TOKEN" not in environ  # the token travels as a file only
    token_path = pathlib.Path(environ["RAY_AUTH_TOKEN_PATH"])
    assert stat.S_IMODE(token_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_path.parent.stat().st_mode) == 0o700
    token = token_path.read_text().strip()
    assert len(token) >= 32
    assert token not in (folder / "serve.log").read_text()

    # What an outside caller tried: the node table, the actor table, the KV.
    with grpc.insecure_channel(f"127.0.0.1:{gcs_port}") as channel:
        calls = [
            lambda metadata: gcs_grpc.NodeInfoGcsServiceStub(channel).GetAllNodeInfo(
                gcs.GetAllNodeInfoRequest(), metadata=metadata, timeout=10),
            lambda metadata: gcs_grpc.ActorInfoGcsServiceStub(channel).GetAllActorInfo(
                gcs.GetAllActorInfoRequest(), metadata=metadata, timeout=10),
            lambda metadata: gcs_grpc.InternalKVGcsServiceStub(channel).InternalKVKeys(
                gcs.InternalKVKeysRequest(prefix=b""), metadata=metadata, timeout=10)]
        for call in calls:
            for metadata in ((), (("authorization", "Bearer " + "0" * 64),)):
                with pytest.raises(grpc.RpcError) as refused:
                    call(metadata)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # The same call with the token is answered: the refusal was the token's.
            call((("authorization", f"Bearer {token}"),))


def run_second(command):
    return subprocess.run(command, env=serve_env(), capture_output=True, text=True,
                          timeout=300)


def test_a_second_server_on_the_data_directory_refuses(server, tmp_path):
    process, address, folder = server
    data = folder / "data"
    in_flight = data / "adapters" / ".incoming" / "upload-in-progress"
    in_flight.mkdir(parents=True)
    (in_flight / "adapter.safetensors").write_bytes(b"half an upload")
    second = run_second(serve_command(data))
    assert second.returncode != 0
    assert f"the data directory {data} is in use" in second.stderr
    assert f"(pid {process.pid})" in second.stderr
    assert "ready on" not in second.stdout
    # Its start cleared nothing of the first server's.
    assert (in_flight / "adapter.safetensors").read_bytes() == b"half an upload"
    with GemmaClient(address, api_key=KEY) as client:
        client.forward(token_ids=[[1, 2, 3]])


def test_a_second_server_on_the_port_refuses(server, tmp_path):
    process, address, _ = server
    port = int(address.rsplit(":", 1)[1])
    second = run_second(serve_command(tmp_path / "data", port=port))
    assert second.returncode != 0
    assert f"port {port} on 127.0.0.1 is in use" in second.stderr
    assert "ready on" not in second.stdout
    with GemmaClient(address, api_key=KEY) as client:  # the first one still answers
        client.forward(token_ids=[[1, 2, 3]])
