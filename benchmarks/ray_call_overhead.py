"""What one Ray call to a worker costs beyond the device time it reports.

One `BackboneWorker` actor (threaded, as the service starts it) pinned to
core 1 with one XLA thread, this process on core 0; `run_batch` of a 1x32
batch (8 real tokens, mean pooling) called back to back, and, for the
floor, `info` (no device work). Per model: the median round trip, the
median device time the worker reports, and their difference (the call's
own cost: argument and result transfer, Ray's threads, anything else in
the worker process on the core). Models: the built-in default (tiny) and
the mid config of service_throughput.py.

    .venv/bin/python benchmarks/ray_call_overhead.py        # about 2 minutes
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402
import ray  # noqa: E402

from service_throughput import make_mid_preset  # noqa: E402
from worker.actor_options import actor_options  # noqa: E402
from worker.backbone_worker import CONCURRENCY_GROUPS, BackboneWorker  # noqa: E402
from worker.batch import Batch, BatchRow  # noqa: E402
from worker.worker_config import BatchingConfig, WorkerSpec  # noqa: E402

CALLS, SKIPPED = 200, 40


class PinnedWorker(BackboneWorker):
    """The worker on core 1, before JAX starts its threads."""

    def __init__(self, *args):
        os.sched_setaffinity(0, {1})
        super().__init__(*args)


async def measure(actor) -> dict:
    ids = np.zeros((1, 32), "int32")
    ids[0, :8] = 2
    batch = Batch(ids, (ids > 0).astype("int32"), np.zeros(4, "int32"),
                  np.zeros(1, "int32"), (BatchRow(8, (0,), "mean"),))
    calls, device, info = [], [], []
    for _ in range(CALLS):
        started = time.perf_counter()
        result = await actor.run_batch.remote(batch)
        calls.append(time.perf_counter() - started)
        device.append(result.device_seconds)
        started = time.perf_counter()
        await actor.info.remote()
        info.append(time.perf_counter() - started)
    calls, device, info = calls[SKIPPED:], device[SKIPPED:], info[SKIPPED:]
    return dict(call=statistics.median(calls), device=statistics.median(device),
                overhead=statistics.median(np.subtract(calls, device)),
                info=statistics.median(info))


def main() -> None:
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    os.sched_setaffinity(0, {0})
    remote = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(PinnedWorker)
    rows = []
    with tempfile.TemporaryDirectory() as mid:
        make_mid_preset(mid)
        for name, preset in (("default", "default"), ("mid", mid)):
            spec = WorkerSpec(preset, cpus=1, batching=BatchingConfig(
                length_buckets=(32,), batch_buckets=(1,), max_batch_tokens=32))
            actor = remote.options(max_concurrency=8, **actor_options(spec)).remote(name, spec)
            ray.get(actor.info.remote())
            rows.append((name, asyncio.run(measure(actor))))
            ray.kill(actor)
    print(f"{'model':<8}{'call ms':>10}{'device ms':>11}{'call-device':>13}{'info ms':>10}")
    for name, r in rows:
        print(f"{name:<8}{1e3 * r['call']:>10.2f}{1e3 * r['device']:>11.2f}"
              f"{1e3 * r['overhead']:>13.2f}{1e3 * r['info']:>10.2f}")


if __name__ == "__main__":
    main()
