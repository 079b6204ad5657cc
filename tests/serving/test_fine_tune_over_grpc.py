"""Fine-tune jobs through the real service: train, publish, serve; cancel; refuse."""

import grpc
import numpy as np
import pytest

from service_support import ACME_KEY, GLOBEX_KEY, keyed_channel
from coordinator.generated.gemma.v1 import adapter_service_pb2 as apb
from coordinator.generated.gemma.v1 import adapter_service_pb2_grpc as apb_grpc
from coordinator.generated.gemma.v1 import finetune_service_pb2 as fpb
from coordinator.generated.gemma.v1 import finetune_service_pb2_grpc as fpb_grpc

# A repeating pattern is learnable by a LoRA on a 4-layer random model.
PATTERN = [11, 12, 13, 14, 15, 16, 17, 18] * 4


@pytest.fixture(scope="module")
def stubs(service):
    with keyed_channel(service.address, ACME_KEY) as channel:
        yield fpb_grpc.FineTuneServiceStub(channel), apb_grpc.AdapterServiceStub(channel)


def watch_to_end(stub, job_id):
    updates = list(stub.WatchFineTune(fpb.WatchFineTuneRequest(job_id=job_id), timeout=600))
    return updates, updates[-1]


def test_fine_tune_lowers_the_loss_publishes_and_serves(stubs, client):
    tune, adapters = stubs
    job = tune.StartFineTune(fpb.StartFineTuneRequest(
        adapter_name="pattern", sequences=[fpb.TrainingSequence(ids=PATTERN[i:] + PATTERN[:i])
                                           for i in range(8)],
        rank=4, learning_rate=1e-2, steps=40, batch_size=8, sequence_length=32, seed=1))
    assert job.state in (fpb.FINE_TUNE_STATE_QUEUED, fpb.FINE_TUNE_STATE_RUNNING)
    updates, final = watch_to_end(tune, job.job_id)
    assert final.state == fpb.FINE_TUNE_STATE_SUCCEEDED, final.error
    assert final.step == final.total_steps == 40 and final.adapter_id == "pattern@1"
    # The random default model's small embeddings bound its logits, so the
    # loss cannot fall far below ln(vocab) / 2; a clear drop is what counts.
    assert final.loss < 0.75 * final.first_loss
    assert any(u.state == fpb.FINE_TUNE_STATE_RUNNING and 0 < u.step < 40 for u in updates)
    assert final.tokens_per_second > 0
    listed = {a.adapter_id: a for a in adapters.ListAdapters(apb.ListAdaptersRequest()).adapters}
    assert listed["pattern@1"].source == f"finetune:{job.job_id}"
    ids = [PATTERN[:12]]
    tuned = client.forward(token_ids=ids, adapter_id="pattern@1").hidden_states[0][0]
    plain = client.forward(token_ids=ids).hidden_states[0][0]
    assert np.abs(tuned - plain).max() > 1e-3
    jobs = tune.ListFineTunes(fpb.ListFineTunesRequest()).jobs
    assert job.job_id in {j.job_id for j in jobs}


def test_cancel_mid_way_publishes_nothing_and_jobs_spread_over_workers(stubs, client):
    tune, adapters = stubs
    jobs, running = [], []
    for name in ("never", "never-either"):
        jobs.append(tune.StartFineTune(fpb.StartFineTuneRequest(
            adapter_name=name, texts=["one two three four five"] * 8, steps=100_000,
            batch_size=4, sequence_length=16)))
        for update in tune.WatchFineTune(fpb.WatchFineTuneRequest(job_id=jobs[-1].job_id),
                                         timeout=300):
            if update.step >= 2:
                running.append(update)
                break
        client.forward(token_ids=[[5, 6, 7]])  # routing turns move on; placement must not
    # Two jobs, two workers: each trains on its own (the session has 2),
    # whatever the forward traffic in between.
    assert running[0].worker_id != running[1].worker_id
    for job in jobs:
        cancelled = tune.CancelFineTune(fpb.CancelFineTuneRequest(job_id=job.job_id),
                                        timeout=120)
        assert cancelled.state == fpb.FINE_TUNE_STATE_CANCELLED and cancelled.step < 100_000
    names = {a.name for a in adapters.ListAdapters(apb.ListAdaptersRequest()).adapters}
    assert not names & {"never", "never-either"}


def test_dataset_upload_then_train_from_a_previous_adapter(stubs):
    tune, adapters = stubs
    lines = b"".join(b'{"ids": %s}\n' % str(PATTERN[i:] + PATTERN[:i]).encode()
                     for i in range(4)) + b'{"text": "plain text works too"}\n'
    dataset = tune.UploadDataset(iter([fpb.UploadDatasetRequest(name="pattern-data"),
                                       fpb.UploadDatasetRequest(data=lines[:50]),
                                       fpb.UploadDatasetRequest(data=lines[50:])]))
    assert dataset.num_examples == 5
    first = tune.StartFineTune(fpb.StartFineTuneRequest(
        adapter_name="chained", dataset_id="pattern-data", rank=2, steps=3, batch_size=4,
        sequence_length=32))
    _, first_end = watch_to_end(tune, first.job_id)
    assert first_end.state == fpb.FINE_TUNE_STATE_SUCCEEDED, first_end.error
    second = tune.StartFineTune(fpb.StartFineTuneRequest(
        adapter_name="chained", dataset_id="pattern-data", initial_adapter_id="chained@1",
        steps=3, batch_size=4, sequence_length=32))
    _, second_end = watch_to_end(tune, second.job_id)
    assert second_end.state == fpb.FINE_TUNE_STATE_SUCCEEDED, second_end.error
    assert second_end.adapter_id == "chained@2"
    # Training continued from the first adapter, not from scratch.
    assert second_end.first_loss < first_end.first_loss
    ranks = {a.adapter_id: a.rank for a in adapters.ListAdapters(
        apb.ListAdaptersRequest()).adapters}
    assert ranks["chained@2"] == 2  # rank unset: the initial adapter's

    # A larger rank extends the initial adapter; a smaller one is refused.
    with pytest.raises(grpc.RpcError) as caught:
        tune.StartFineTune(fpb.StartFineTuneRequest(
            adapter_name="chained", dataset_id="pattern-data", initial_adapter_id="chained@1",
            rank=1, steps=1, batch_size=4, sequence_length=32))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "rank" in caught.value.details() and "(2)" in caught.value.details()
    wider = tune.StartFineTune(fpb.StartFineTuneRequest(
        adapter_name="chained", dataset_id="pattern-data", initial_adapter_id="chained@1",
        rank=4, steps=1, batch_size=4, sequence_length=32))
    _, wider_end = watch_to_end(tune, wider.job_id)
    assert wider_end.state == fpb.FINE_TUNE_STATE_SUCCEEDED, wider_end.error
    assert {a.adapter_id: a.rank for a in adapters.ListAdapters(
        apb.ListAdaptersRequest()).adapters}[wider_end.adapter_id] == 4


BAD_STARTS = {
    "no data": dict(adapter_name="x"),
    "two data sources": dict(adapter_name="x", texts=["a b"], dataset_id="d"),
    "bad name": dict(adapter_name="../etc", texts=["a b c"]),
    "rank too large": dict(adapter_name="x", texts=["a b c"], rank=64),
    "steps and epochs": dict(adapter_name="x", texts=["a b c"], steps=2, epochs=2),
    "one-token sequence": dict(adapter_name="x", sequences=[fpb.TrainingSequence(ids=[5])]),
    "id out of range": dict(adapter_name="x", sequences=[fpb.TrainingSequence(ids=[5, 5000])]),
    "too long": dict(adapter_name="x", texts=["a b"], sequence_length=1 << 20),
    "learning rate": dict(adapter_name="x", texts=["a b"], learning_rate=5.0),
}


@pytest.mark.parametrize("case", sorted(BAD_STARTS))
def test_bad_fine_tune_requests_are_invalid_argument(stubs, case):
    tune, _ = stubs
    with pytest.raises(grpc.RpcError) as caught:
        tune.StartFineTune(fpb.StartFineTuneRequest(**BAD_STARTS[case]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()


def test_unknown_and_foreign_ids_are_not_found(stubs, service):
    tune, _ = stubs
    job = tune.StartFineTune(fpb.StartFineTuneRequest(adapter_name="mine", texts=["a b c"],
                                                      steps=1, batch_size=1))
    with keyed_channel(service.address, GLOBEX_KEY) as channel:
        other = fpb_grpc.FineTuneServiceStub(channel)
        for job_id in (job.job_id, "ft-doesnotexist"):
            with pytest.raises(grpc.RpcError) as caught:
                other.CancelFineTune(fpb.CancelFineTuneRequest(job_id=job_id))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert job.job_id not in {j.job_id for j in other.ListFineTunes(
            fpb.ListFineTunesRequest()).jobs}
        for request in (dict(dataset_id="pattern-data"), dict(initial_adapter_id="pattern@1",
                                                              texts=["a b"])):
            with pytest.raises(grpc.RpcError) as caught:
                other.StartFineTune(fpb.StartFineTuneRequest(adapter_name="steal", **request))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    watch_to_end(tune, job.job_id)
