"""Loading holds one copy of the weights plus one tensor, not two copies."""

import json
import subprocess
import sys
import textwrap

import pytest

from fixture_support import FIXTURES

# ~100 MB of float32 weights: large against the interpreter's own footprint.
CONFIG = dict(vocabulary_size=8192, num_layers=6, num_query_heads=8, num_key_value_heads=2,
              hidden_dim=512, intermediate_dim=4096, head_dim=64)

PROBE = textwrap.dedent("""
    import os, resource, sys, json
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import numpy as np
    from gemma_core import GemmaBackbone
    # Warm up imports, XLA and allocator with a tiny model first.
    GemmaBackbone.from_preset(sys.argv[2])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    backbone = GemmaBackbone.from_preset(sys.argv[1])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weights = sum(np.asarray(v.value).nbytes for v in backbone.weights)
    print(json.dumps({"peak_growth": after - before, "weights": weights}))
""")


@pytest.mark.slow
def test_peak_memory_of_loading_is_one_copy(tmp_path):
    save = ("import os; os.environ['KERAS_BACKEND'] = 'jax'\n"
            "import sys, json\nfrom gemma_core import GemmaBackbone\n"
            "GemmaBackbone(**json.loads(sys.argv[1])).save_to_preset(sys.argv[2])\n")
    subprocess.run([sys.executable, "-c", save, json.dumps(CONFIG), str(tmp_path)], check=True)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path), str(FIXTURES / "gemma1_tiny")],
        capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    weights, growth = result["weights"], result["peak_growth"]
    assert weights > 90e6
    # One copy of the model plus its largest tensor (the 16 MB embedding) and
    # slack; two full copies would be 2x.
    assert growth < 1.5 * weights, (growth, weights)
