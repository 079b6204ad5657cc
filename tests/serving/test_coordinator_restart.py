"""A `gemma-serve` process on keras_hub's tiny fixture: its LoRA file served
over gRPC reproduces keras_hub's outputs, and killing the coordinator in the
middle of an upload loses nothing and leaves nothing half-written."""

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from coordinator.client import GemmaClient
from coordinator.generated.gemma.v1 import adapter_service_pb2 as apb
from coordinator.generated.gemma.v1 import adapter_service_pb2_grpc as apb_grpc

BIN = pathlib.Path(sys.executable).parent
FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "gemma1_tiny"
LORA_H5 = apb.ADAPTER_FORMAT_KERAS_HUB_LORA_H5


def start_serve(ray_address, data_dir, log_path):
    """gemma-serve on the fixture, joined to the test session's Ray, auth off."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("XLA_FLAGS", None)
    env.pop("GEMMA_SERVE_API_KEYS", None)
    process = subprocess.Popen(
        [BIN / "gemma-serve", "--preset", str(FIXTURE), "--ray-address", ray_address,
         "--workers", "1", "--mesh", "1x1", "--port", "0", "--data-dir", str(data_dir),
         "--length-buckets", "16,64", "--batch-buckets", "1,4"],
        env=env, stdout=subprocess.PIPE, stderr=open(log_path, "a"), text=True,
        start_new_session=True)
    ready = process.stdout.readline()
    assert "gemma-serve ready on" in ready, pathlib.Path(log_path).read_text()[-3000:]
    assert "auth=OFF" in ready
    return process, ready.split(" ready on ")[1].split()[0]


def kill(process, sig=signal.SIGKILL):
    if process.poll() is None:
        os.killpg(process.pid, sig)
        process.wait(30)


def upload(stub, name, data, pause_s=0.0, chunk=4096):
    def requests():
        yield apb.UploadAdapterRequest(header=apb.UploadHeader(name=name, format=LORA_H5))
        for start in range(0, len(data), chunk):
            time.sleep(pause_s)
            yield apb.UploadAdapterRequest(data=data[start:start + chunk])
    return stub.UploadAdapter(requests(), timeout=120)


def test_keras_hub_lora_and_a_coordinator_killed_mid_upload(ray_session, tmp_path):
    ray_address = ray_session.get_runtime_context().gcs_address
    data_dir, log = tmp_path / "data", tmp_path / "serve.log"
    reference = np.load(FIXTURE / "reference_outputs.npz")
    lora_file = (FIXTURE / "adapter.lora.h5").read_bytes()

    process, address = start_serve(ray_address, data_dir, log)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = apb_grpc.AdapterServiceStub(channel)
            record = upload(stub, "keras-hub", lora_file)
            assert record.adapter_id == "keras-hub@1" and record.rank == 4
            with GemmaClient(address) as client:
                for row, mask in enumerate(reference["padding_mask"]):
                    ids = reference["token_ids"][row][mask == 1]
                    got = client.forward(token_ids=[ids], adapter_id="keras-hub").hidden_states
                    np.testing.assert_allclose(
                        got[0][0], reference["hidden_states_with_lora"][row][mask == 1],
                        atol=1e-5)
            # A slow upload of a valid adapter (2.5 s) in flight when the
            # coordinator dies: had it finished, it would be listed.
            threading.Thread(target=lambda: _ignore(upload, stub, "half", lora_file,
                                                    pause_s=0.05, chunk=512),
                             daemon=True).start()
            incoming = data_dir / "adapters" / ".incoming"
            deadline = time.time() + 60
            while not any(incoming.glob("upload-*")) and time.time() < deadline:
                time.sleep(0.05)
            assert any(incoming.glob("upload-*")), "the upload never reached the server"
            time.sleep(0.3)
    finally:
        kill(process)

    process, address = start_serve(ray_address, data_dir, log)
    try:
        assert not any((data_dir / "adapters" / ".incoming").iterdir())
        with grpc.insecure_channel(address) as channel:
            stub = apb_grpc.AdapterServiceStub(channel)
            listed = [a.adapter_id for a in stub.ListAdapters(apb.ListAdaptersRequest()).adapters]
            assert listed == ["keras-hub@1"]
            loaded = stub.LoadAdapter(apb.LoadAdapterRequest(adapter_id="keras-hub@1"))
            assert loaded.workers == ["worker-0"]
    finally:
        kill(process, signal.SIGTERM)


def _ignore(function, *args, **kwargs):
    try:
        function(*args, **kwargs)
    except grpc.RpcError:
        pass  # the server was killed under it, as intended
