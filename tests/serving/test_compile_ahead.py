"""Workers compile every bucket before ready, and a restart on the same
compilation cache loads those programs instead of compiling them."""

import os

from coordinator.client import GemmaClient
from coordinator.server import worker_spec
from coordinator.service_config import ServiceConfig
from test_tls_admission_shutdown import start_serve, stop
from worker.worker_config import WorkerSpec


def test_a_restart_on_the_same_cache_compiles_nothing(ray_session, tmp_path):
    cache = tmp_path / "compilation-cache"
    infos = []
    for _ in range(2):
        process, address = start_serve(ray_session, tmp_path, "--compilation-cache-dir", cache,
                                       shared_cache=False)
        try:
            with GemmaClient(address) as client:
                client.forward(token_ids=[[1, 2, 3]] * 4)  # a bucket shape: nothing compiles
                infos.append(client.model_info())
        finally:
            stop(process)
    (cold,), (warm,) = (info["workers"] for info in infos)
    buckets = infos[0]["limits"]["bucket_count"]
    # A forward and a score program per bucket.
    assert int(cold["compiled_functions"]) == int(warm["compiled_functions"]) == 2 * buckets
    # Cold: every bucket program (and the slot writer) compiled before ready.
    assert int(cold["programs_compiled"]) >= 2 * buckets + 1
    assert int(cold.get("programs_from_cache", 0)) == 0
    # Warm: every one of them came from the cache.
    assert int(warm.get("programs_compiled", 0)) == 0, {
        k: v for k, v in warm.items() if "program" in k or "compile" in k}
    assert int(warm["programs_from_cache"]) >= 2 * buckets + 1
    assert any(cache.iterdir())


def test_the_cache_lives_under_the_data_dir_unless_workers_are_on_other_nodes(tmp_path):
    local = ServiceConfig(worker=WorkerSpec("default"), data_dir=str(tmp_path))
    assert worker_spec(local).compilation_cache_dir == os.path.join(tmp_path,
                                                                    "compilation-cache")
    joined = ServiceConfig(worker=WorkerSpec("default"), data_dir=str(tmp_path),
                           ray_address="10.0.0.5:6379")
    assert worker_spec(joined).compilation_cache_dir is None  # each node's own
    named = ServiceConfig(worker=WorkerSpec("default", compilation_cache_dir="/fast/xla"),
                          data_dir=str(tmp_path))
    assert worker_spec(named).compilation_cache_dir == "/fast/xla"
