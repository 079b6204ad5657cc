"""Workers compile every bucket before ready, and a restart on the same data
directory loads those programs from the persistent compilation cache."""

from coordinator.client import GemmaClient
from test_tls_admission_shutdown import start_serve, stop


def test_a_restart_on_the_same_data_dir_compiles_nothing(ray_session, tmp_path):
    infos = []
    for _ in range(2):
        process, address = start_serve(ray_session, tmp_path, shared_cache=False)
        try:
            with GemmaClient(address) as client:
                client.forward(token_ids=[[1, 2, 3]] * 4)  # a bucket shape: nothing compiles
                infos.append(client.model_info())
        finally:
            stop(process)
    (cold,), (warm,) = (info["workers"] for info in infos)
    buckets = infos[0]["limits"]["bucket_count"]
    assert int(cold["compiled_functions"]) == int(warm["compiled_functions"]) == buckets
    # Cold: every bucket program (and the slot writer) compiled before ready.
    assert int(cold["programs_compiled"]) >= buckets + 1
    assert int(cold.get("programs_from_cache", 0)) == 0
    # Warm: every one of them came from the cache under the data directory.
    assert int(warm.get("programs_compiled", 0)) == 0, {k: v for k, v in warm.items() if "program" in k or "compile" in k}
    assert int(warm["programs_from_cache"]) >= buckets + 1
    assert any((tmp_path / "data" / "compilation-cache").iterdir())
