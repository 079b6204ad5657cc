"""A `gemma-serve` process on keras_hub's tiny fixture: its LoRA file served
over gRPC reproduces keras_hub's outputs, and killing the coordinator in the
middle of an upload and a fine-tune job loses nothing and leaves nothing
half-written; the restarted one still answers for its jobs."""

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

from service_support import shared_compilation_cache
from coordinator.client import GemmaClient
from coordinator.generated.gemma.v1 import adapter_service_pb2 as apb
from coordinator.generated.gemma.v1 import adapter_service_pb2_grpc as apb_grpc
from coordinator.generated.gemma.v1 import finetune_service_pb2 as fpb
from coordinator.generated.gemma.v1 import finetune_service_pb2_grpc as fpb_grpc

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
         "--length-buckets", "16,64", "--batch-buckets", "1,4", *shared_compilation_cache()],
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
            # A finished fine-tune job, and one still training when the
            # coordinator dies.
            tune = fpb_grpc.FineTuneServiceStub(channel)
            training = [fpb.TrainingSequence(ids=[2, 5, 6, 7, 8, 9])] * 4
            done = tune.StartFineTune(fpb.StartFineTuneRequest(
                adapter_name="tuned", sequences=training, rank=2, steps=2, batch_size=2))
            *_, done_end = tune.WatchFineTune(fpb.WatchFineTuneRequest(job_id=done.job_id),
                                              timeout=300)
            assert done_end.state == fpb.FINE_TUNE_STATE_SUCCEEDED, done_end.error
            running = tune.StartFineTune(fpb.StartFineTuneRequest(
                adapter_name="never", sequences=training, rank=2, steps=1_000_000,
                batch_size=2))
            for update in tune.WatchFineTune(
                    fpb.WatchFineTuneRequest(job_id=running.job_id), timeout=300):
                if update.step >= 1:
                    break
            time.sleep(1.5)  # progress reaches the job journal at least once a second
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
            assert sorted(listed) == ["keras-hub@1", "tuned@1"]
            loaded = stub.LoadAdapter(apb.LoadAdapterRequest(adapter_id="keras-hub@1"))
            assert loaded.workers == ["worker-0"]

            # Both jobs are still known: the finished one as it ended, the
            # interrupted one as such (nothing published), and watching it ends.
            tune = fpb_grpc.FineTuneServiceStub(channel)
            jobs = {j.job_id: j for j in tune.ListFineTunes(fpb.ListFineTunesRequest()).jobs}
            assert jobs[done.job_id].state == fpb.FINE_TUNE_STATE_SUCCEEDED
            assert jobs[done.job_id].adapter_id == "tuned@1"
            assert jobs[done.job_id].step == 2
            interrupted = jobs[running.job_id]
            assert interrupted.state == fpb.FINE_TUNE_STATE_INTERRUPTED
            assert "coordinator restarted" in interrupted.error and interrupted.step >= 1
            updates = list(tune.WatchFineTune(
                fpb.WatchFineTuneRequest(job_id=running.job_id), timeout=30))
            assert [u.state for u in updates] == [fpb.FINE_TUNE_STATE_INTERRUPTED]
            # It no longer counts against the tenant's limit of active jobs.
            again = tune.StartFineTune(fpb.StartFineTuneRequest(
                adapter_name="again", sequences=training, rank=2, steps=1, batch_size=2))
            *_, again_end = tune.WatchFineTune(fpb.WatchFineTuneRequest(job_id=again.job_id),
                                               timeout=300)
            assert again_end.state == fpb.FINE_TUNE_STATE_SUCCEEDED, again_end.error
    finally:
        kill(process, signal.SIGTERM)


def _ignore(function, *args, **kwargs):
    try:
        function(*args, **kwargs)
    except grpc.RpcError:
        pass  # the server was killed under it, as intended
