"""Test-wide setup: JAX on 8 fake CPU devices, set before JAX is imported."""

import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fixture_support import FIXTURES, TINY_CONFIG, reference, reference_inputs  # noqa: E402,F401


@pytest.fixture(scope="session")
def fixtures_dir():
    return FIXTURES


@pytest.fixture()
def tiny_backbone():
    import keras
    from gemma_core import GemmaBackbone
    keras.utils.set_random_seed(0)
    return GemmaBackbone(**TINY_CONFIG)


@pytest.fixture()
def tiny_inputs():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, TINY_CONFIG["vocabulary_size"], size=(2, 12)).astype("int32")
    mask = np.ones((2, 12), "int32")
    mask[1, 9:] = 0
    return {"token_ids": ids, "padding_mask": mask}


def pytest_collection_modifyitems(config, items):
    """JAX_PLATFORMS=cuda (or gpu) runs the tests marked gpu, and only those
    (the rest expect 8 fake CPU devices); any other run leaves them out."""
    on_gpu = any(name in os.environ["JAX_PLATFORMS"] for name in ("cuda", "gpu"))
    keep, drop = [], []
    for item in items:
        (keep if (item.get_closest_marker("gpu") is not None) == on_gpu else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
