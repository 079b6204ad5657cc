"""GemmaClient's adapter / dataset / fine-tune calls and the `gemma-client
adapters|datasets|finetune` commands, against the running service.

The service is shared by the whole session: everything made here is named
"cli-..." and deleted again.
"""

import os
import pathlib
import re
import subprocess
import sys

import grpc
import numpy as np
import pytest

from service_support import ACME_KEY, GLOBEX_KEY
from coordinator.client import GemmaClient, adapter_format
from coordinator.generated.gemma.v1 import adapter_service_pb2 as adapter_pb
from gemma_core import LoraAdapter
from gemma_core.default_preset import DEFAULT_CONFIG

BIN = pathlib.Path(sys.executable).parent
OTHER_MODEL_ADAPTER = (pathlib.Path(__file__).parents[1] / "fixtures" / "gemma1_tiny"
                       / "adapter.lora.h5")
TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "A stitch in time saves nine.",
         "Hello there, how are you today?",
         "Rain in Spain stays mainly in the plain."]


def make_adapter(seed: int, rank: int = 4) -> LoraAdapter:
    """A random adapter for the served model (query and value of every block)."""
    return LoraAdapter.random(DEFAULT_CONFIG, rank, seed=seed, std=0.1)


def write_adapter(path: pathlib.Path, seed: int) -> LoraAdapter:
    adapter = make_adapter(seed)
    adapter.write_lora_file(path, DEFAULT_CONFIG)
    return adapter


def assert_same_adapter(got: LoraAdapter, want: LoraAdapter) -> None:
    assert (got.rank, got.alpha) == (want.rank, want.alpha)
    assert sorted(got.kernels) == sorted(want.kernels)
    for key, (a, b) in want.kernels.items():
        np.testing.assert_allclose(got.kernels[key][0], a, rtol=1e-6, atol=0)
        np.testing.assert_allclose(got.kernels[key][1], b * want.scale, rtol=1e-6, atol=0)


def ids_of(adapters) -> list[str]:
    return [adapter["adapter_id"] for adapter in adapters]


def gemma_client(service, *args, api_key=ACME_KEY, env=None):
    key = ["--api-key", api_key] if api_key else []
    return subprocess.run([BIN / "gemma-client", "--target", service.address, *key, *args],
                          capture_output=True, text=True, timeout=180,
                          env=None if env is None else {**os.environ, **env})


@pytest.fixture
def cleanup(client):
    """Adapter names to delete (every version) after the test."""
    names = []
    yield names
    for name in names:
        try:
            client.delete_adapter(name)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND, error


# ---- the library -------------------------------------------------------------


def test_format_comes_from_the_file_name():
    assert adapter_format("a/x.lora.h5") == adapter_pb.ADAPTER_FORMAT_KERAS_HUB_LORA_H5
    assert adapter_format("x.SafeTensors") == adapter_pb.ADAPTER_FORMAT_SAFETENSORS
    assert adapter_format("x.bin", "safetensors") == adapter_pb.ADAPTER_FORMAT_SAFETENSORS
    assert adapter_format("x", "KERAS_HUB_LORA_H5") == \
        adapter_pb.ADAPTER_FORMAT_KERAS_HUB_LORA_H5
    with pytest.raises(ValueError, match="cannot tell the adapter format"):
        adapter_format("x.h5")
    with pytest.raises(ValueError, match="unknown adapter format"):
        adapter_format("x.lora.h5", "onnx")


def test_upload_list_load_forward_export_delete(client, service, tmp_path, cleanup):
    cleanup.append("cli-lib")
    uploaded_adapter = write_adapter(tmp_path / "cli-lib.lora.h5", seed=1)
    adapter = client.upload_adapter("cli-lib", tmp_path / "cli-lib.lora.h5")
    adapter_id = adapter["adapter_id"]
    assert re.fullmatch(r"cli-lib@\d+", adapter_id)
    assert adapter["name"] == "cli-lib" and adapter["rank"] == 4 and adapter["alpha"] == 4.0
    assert adapter["layers"] == [0, 1, 2, 3] and adapter["targets"] == ["query", "value"]
    assert adapter["source"] == "upload:lora.h5"
    assert adapter["num_parameters"] == uploaded_adapter.num_parameters()
    assert isinstance(adapter["size_bytes"], int) and adapter["size_bytes"] > 0

    listed = {a["adapter_id"]: a for a in client.list_adapters()}
    assert listed[adapter_id]["sha256"] == adapter["sha256"]

    loaded = client.load_adapter(adapter_id)
    assert loaded["adapter"]["adapter_id"] == adapter_id
    assert loaded["workers"] and loaded["load_ms"] >= 0

    base = client.forward(texts=["Hello there"], layers=[-1]).hidden_states[0][0]
    adapted = client.forward(texts=["Hello there"], layers=[-1], adapter_id=adapter_id)
    latest = client.forward(texts=["Hello there"], layers=[-1], adapter_id="cli-lib")
    assert adapted.hidden_states[0][0].shape == base.shape
    assert not np.allclose(adapted.hidden_states[0][0], base, atol=1e-3)
    np.testing.assert_allclose(latest.hidden_states[0][0], adapted.hidden_states[0][0],
                               atol=1e-5)

    workers = {w["worker_id"] for w in client.model_info()["workers"]}
    assert set(loaded["workers"]) <= workers
    assert set(client.unload_adapter(adapter_id)) <= workers

    out = client.export_adapter(adapter_id, tmp_path / "exported.lora.h5")
    assert out == tmp_path / "exported.lora.h5"
    assert_same_adapter(LoraAdapter.from_lora_file(out, DEFAULT_CONFIG), uploaded_adapter)
    into_dir = client.export_adapter(adapter_id, tmp_path)
    assert into_dir.parent == tmp_path and into_dir.name.endswith(".lora.h5")
    assert into_dir.read_bytes() == out.read_bytes()
    assert not list(tmp_path.glob(".*.part"))  # no temp files left behind

    deleted = client.delete_adapter(adapter_id)
    assert ids_of(deleted) == [adapter_id]
    assert adapter_id not in ids_of(client.list_adapters())
    with pytest.raises(grpc.RpcError) as error:
        client.forward(texts=["Hello there"], adapter_id=adapter_id)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_upload_errors_surface_as_rpc_errors(client, tmp_path):
    with pytest.raises(grpc.RpcError) as error:  # another model's adapter
        client.upload_adapter("cli-other", OTHER_MODEL_ADAPTER)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    big = tmp_path / "big.safetensors"  # streamed in 2 chunks, over the 1 MiB cap
    big.write_bytes(b"\0" * ((1 << 20) + 4096))
    with pytest.raises(grpc.RpcError) as error:
        client.upload_adapter("cli-big", big)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    names = {a["name"] for a in client.list_adapters()}
    assert not names & {"cli-other", "cli-big"}
    with pytest.raises(grpc.RpcError) as error:
        client.export_adapter("cli-missing", tmp_path / "missing.lora.h5")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert not (tmp_path / "missing.lora.h5").exists()


def test_dataset_then_fine_tune(client, tmp_path, cleanup):
    cleanup.append("cli-lib-ft")
    dataset = client.upload_dataset("cli-data", TEXTS[:2] + [[2, 10, 20, 30, 40]])
    assert dataset == {"dataset_id": "cli-data", "num_examples": 3,
                       "num_tokens": dataset["num_tokens"]}
    assert dataset["num_tokens"] > 5
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"text": "one two three"}\n{"ids": [2, 5, 6, 7]}\n')
    assert client.upload_dataset("cli-data-file", jsonl)["num_examples"] == 2

    job = client.start_fine_tune("cli-lib-ft", dataset_id="cli-data", steps=3, rank=2,
                                 batch_size=2, sequence_length=16, seed=3)
    assert job["state"] in ("queued", "running") and job["adapter_name"] == "cli-lib-ft"
    updates = list(client.watch_fine_tune(job["job_id"]))
    final = updates[-1]
    assert final["state"] == "succeeded", final
    assert final["step"] == final["total_steps"] == 3
    assert re.fullmatch(r"cli-lib-ft@\d+", final["adapter_id"])
    assert final["job_id"] in [j["job_id"] for j in client.list_fine_tunes()]
    trained = {a["adapter_id"]: a for a in client.list_adapters()}[final["adapter_id"]]
    assert trained["rank"] == 2 and trained["source"] == f"finetune:{job['job_id']}"

    with pytest.raises(grpc.RpcError) as error:  # data two ways
        client.start_fine_tune("cli-lib-ft", texts=TEXTS, dataset_id="cli-data")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_datasets_are_listed_and_deleted_per_tenant(client, service):
    client.upload_dataset("to-delete", [[2, 5, 6, 7], [2, 8, 9]])
    listed = {d["dataset_id"]: d for d in client.list_datasets()}
    assert listed["to-delete"] == {"dataset_id": "to-delete", "num_examples": 2,
                                   "num_tokens": 7}
    with GemmaClient(service.address, api_key=GLOBEX_KEY) as other:
        assert "to-delete" not in {d["dataset_id"] for d in other.list_datasets()}
        with pytest.raises(grpc.RpcError) as error:  # not theirs to delete
            other.delete_dataset("to-delete")
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert client.delete_dataset("to-delete") == listed["to-delete"]
    assert "to-delete" not in {d["dataset_id"] for d in client.list_datasets()}
    for bad in ("to-delete", "../escape"):  # gone; and never a path
        with pytest.raises(grpc.RpcError) as error:
            client.delete_dataset(bad)
        assert error.value.code() in (grpc.StatusCode.NOT_FOUND,
                                      grpc.StatusCode.INVALID_ARGUMENT), bad
    with pytest.raises(grpc.RpcError) as error:  # a job cannot use it any more
        client.start_fine_tune("never", dataset_id="to-delete", steps=1)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


# ---- the command line --------------------------------------------------------


def test_cli_datasets_upload_list_delete(service, tmp_path):
    data = tmp_path / "cli.jsonl"
    data.write_text('{"ids": [2, 5, 6]}\n{"ids": [2, 7, 8, 9]}\n')
    run = gemma_client(service, "datasets", "upload", "cli-set", str(data))
    assert run.returncode == 0 and "uploaded dataset cli-set: 2 examples, 7 tokens" \
        in run.stdout, run.stderr
    run = gemma_client(service, "datasets", "list")
    assert run.returncode == 0 and "cli-set: 2 examples, 7 tokens" in run.stdout, run.stderr
    run = gemma_client(service, "datasets", "delete", "cli-set")
    assert run.returncode == 0 and "deleted dataset cli-set" in run.stdout, run.stderr
    run = gemma_client(service, "datasets", "delete", "cli-set")
    assert run.returncode != 0 and "NOT_FOUND" in run.stderr


def test_cli_adapters_upload_list_export_delete(service, tmp_path, cleanup):
    cleanup.append("cli-cmd")
    uploaded_adapter = write_adapter(tmp_path / "cmd.lora.h5", seed=2)
    run = gemma_client(service, "adapters", "upload", "cli-cmd", str(tmp_path / "cmd.lora.h5"))
    assert run.returncode == 0, run.stderr
    adapter_id = re.search(r"uploaded (cli-cmd@\d+): rank 4", run.stdout).group(1)

    run = gemma_client(service, "adapters", "list")
    assert run.returncode == 0, run.stderr
    header, *rows = run.stdout.splitlines()
    assert header.split()[:3] == ["ADAPTER_ID", "RANK", "ALPHA"]
    row = next(row.split() for row in rows if row.startswith(adapter_id + " "))
    assert row[1:5] == ["4", "4", "query,value", "0-3"]

    run = gemma_client(service, "adapters", "load", adapter_id)
    assert run.returncode == 0 and run.stdout.startswith(f"loaded {adapter_id} on "), run.stderr
    run = gemma_client(service, "forward", "--text", "Hello", "--adapter", adapter_id)
    assert run.returncode == 0 and f"adapter {adapter_id}" in run.stdout, run.stderr

    out = tmp_path / "out.lora.h5"
    run = gemma_client(service, "adapters", "export", adapter_id, str(out))
    assert run.returncode == 0 and f"exported {adapter_id} to {out}" in run.stdout, run.stderr
    assert_same_adapter(LoraAdapter.from_lora_file(out, DEFAULT_CONFIG), uploaded_adapter)

    run = gemma_client(service, "adapters", "delete", "cli-cmd")
    assert run.returncode == 0 and f"deleted {adapter_id}" in run.stdout, run.stderr
    run = gemma_client(service, "adapters", "list")
    assert run.returncode == 0 and adapter_id not in run.stdout


def test_cli_fine_tune_watch_publishes_an_adapter(service, tmp_path, cleanup):
    cleanup.append("cli-ft")
    texts = [arg for text in TEXTS for arg in ("--text", text)]
    run = gemma_client(service, "finetune", "start", "cli-ft", *texts, "--steps", "6",
                       "--rank", "4", "--batch-size", "2", "--sequence-length", "16",
                       "--lr", "1e-2", "--watch")
    assert run.returncode == 0, run.stdout + run.stderr
    job_id = re.search(r"^job (\S+) (queued|running)", run.stdout, re.M).group(1)
    assert re.search(rf"^job {re.escape(job_id)} succeeded after 6/6 steps", run.stdout, re.M)
    adapter_id = re.search(r"^adapter (cli-ft@\d+)$", run.stdout, re.M).group(1)
    assert "6/6" in run.stderr  # the progress bar

    listed = gemma_client(service, "adapters", "list")
    assert listed.returncode == 0 and re.search(rf"^{re.escape(adapter_id)} ", listed.stdout,
                                                re.M), listed.stdout
    jobs = gemma_client(service, "finetune", "list")
    assert jobs.returncode == 0 and re.search(
        rf"^{re.escape(job_id)}\s+succeeded\s+{re.escape(adapter_id)}\s+6/6", jobs.stdout,
        re.M), jobs.stdout
    again = gemma_client(service, "finetune", "watch", job_id, "--quiet")
    assert again.returncode == 0 and f"adapter {adapter_id}" in again.stdout, again.stderr


def test_cli_cancelled_job_exits_non_zero(service, tmp_path, cleanup):
    cleanup.append("cli-cancel")
    texts_file = tmp_path / "texts.txt"
    texts_file.write_text("\n".join(TEXTS) + "\n")
    run = gemma_client(service, "finetune", "start", "cli-cancel", "--texts-file",
                       str(texts_file), "--steps", "100000", "--batch-size", "2",
                       "--sequence-length", "16")
    assert run.returncode == 0, run.stderr
    job_id = re.search(r"^job (\S+) ", run.stdout).group(1)
    run = gemma_client(service, "finetune", "cancel", job_id)
    assert run.returncode == 0 and f"job {job_id} cancel" in run.stdout, run.stderr
    run = gemma_client(service, "finetune", "watch", job_id)
    assert run.returncode != 0
    assert f"job {job_id} cancelled" in run.stdout
    assert "cli-cancel" not in gemma_client(service, "adapters", "list").stdout


def test_cli_errors_print_the_status_code(service, tmp_path):
    # The key comes from the environment: a missing key would be UNAUTHENTICATED.
    run = gemma_client(service, "adapters", "export", "cli-no-such-adapter",
                       str(tmp_path / "x.lora.h5"), api_key=None,
                       env={"GEMMA_SERVE_API_KEY": ACME_KEY})
    assert run.returncode != 0
    assert run.stderr.startswith("gemma-client: NOT_FOUND: "), run.stderr
    assert not (tmp_path / "x.lora.h5").exists()
    run = gemma_client(service, "adapters", "load", "cli-no-such-adapter")
    assert run.returncode != 0 and "gemma-client: NOT_FOUND: " in run.stderr
    run = gemma_client(service, "finetune", "watch", "no-such-job")
    assert run.returncode != 0 and "gemma-client: NOT_FOUND: " in run.stderr
    run = gemma_client(service, "adapters", "upload", "cli-x", str(tmp_path / "x.bin"))
    assert run.returncode != 0 and "cannot tell the adapter format" in run.stderr
