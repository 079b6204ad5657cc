"""The Node.js example client (examples/node/forward.js) against the running
service: its hidden states must match the Python client's.

Needs `node` and `npm` on PATH (skipped otherwise) and, for `npm ci`, the
npm registry or a warm npm cache: without them the tests fail with npm's
output rather than skip.
"""

import base64
import json
import os
import pathlib
import shutil
import subprocess

import ml_dtypes
import numpy as np
import pytest

from service_support import ACME_KEY

REPO = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "node"
NODE, NPM = shutil.which("node"), shutil.which("npm")
TEXTS = ["Hello there", "The quick brown fox jumps over the lazy dog"]

pytestmark = pytest.mark.skipif(
    not (NODE and NPM), reason="node and npm are not on PATH: cannot run the Node.js example")


@pytest.fixture(scope="module")
def forward_js(tmp_path_factory):
    """examples/node/forward.js in a fresh copy of examples/node and protos
    (laid out as in the repo) with its dependencies installed by `npm ci`,
    as on a fresh clone."""
    root = tmp_path_factory.mktemp("node-client")
    example = root / "examples" / "node"
    shutil.copytree(EXAMPLE, example, ignore=shutil.ignore_patterns("node_modules"))
    shutil.copytree(REPO / "protos", root / "protos")
    env = {**os.environ, "npm_config_update_notifier": "false"}
    install = subprocess.run([NPM, "ci", "--no-audit", "--no-fund"], cwd=example, env=env,
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, f"npm ci failed:\n{install.stdout}\n{install.stderr}"
    return example / "forward.js"


def node_forward(service, forward_js, *args, api_key=ACME_KEY, env=None):
    key = ["--api-key", api_key] if api_key else []
    return subprocess.run([NODE, str(forward_js), "--target", service.address, *key, *args],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def node_json(service, forward_js, *args):
    run = node_forward(service, forward_js, *args, "--json")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def checksum(array):
    """forward.js's checksum (see examples/node/tensors.js), bit for bit."""
    values = np.asarray(array).astype(np.float64).ravel()
    return {"sum": float(np.cumsum(values)[-1]), "abs_sum": float(np.cumsum(np.abs(values))[-1]),
            "first": values[:4].tolist()}


def assert_matches(node, expected):
    """The Node client's JSON against the Python client's ForwardResult for
    the same request: equal ids and shapes, checksums within 1e-3."""
    assert node["request_id"] and node["worker_id"]
    assert len(node["sequences"]) == len(expected.hidden_states)
    for sequence, ids, per_layer in zip(node["sequences"], expected.token_ids,
                                        expected.hidden_states):
        assert sequence["token_ids"] == ids.tolist()
        assert [t["layer"] for t in sequence["tensors"]] == expected.layers
        for tensor, array in zip(sequence["tensors"], per_layer):
            assert tensor["shape"] == list(array.shape)
            want = checksum(array)
            # Relative to the sum of magnitudes: the plain sum may cancel to ~0.
            assert abs(tensor["sum"] - want["sum"]) <= 1e-3 * want["abs_sum"]
            assert tensor["abs_sum"] == pytest.approx(want["abs_sum"], rel=1e-3)
            np.testing.assert_allclose(tensor["first"], want["first"], rtol=1e-3, atol=1e-6)


def test_float32_hidden_states_match_the_python_client(service, client, forward_js):
    texts = [arg for text in TEXTS for arg in ("--text", text)]
    node = node_json(service, forward_js, *texts, "--layers", "0,-1", "--pooling", "none",
                     "--dtype", "float32")
    expected = client.forward(texts=TEXTS, layers=[0, -1], pooling="none", dtype="float32")
    assert node["dtype"] == "DTYPE_FLOAT32" and node["pooling"] == "POOLING_NONE"
    assert_matches(node, expected)
    assert all(len(t["shape"]) == 2 for s in node["sequences"] for t in s["tensors"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_mean_pooled_states_match(service, client, forward_js, dtype):
    ids = [[2, 10, 20, 30, 40], [2, 7, 8]]
    args = [arg for seq in ids for arg in ("--ids", ",".join(map(str, seq)))]
    node = node_json(service, forward_js, *args, "--layers", "0,-1", "--pooling", "mean",
                     "--dtype", dtype)
    expected = client.forward(token_ids=ids, layers=[0, -1], pooling="mean", dtype=dtype)
    assert node["dtype"] == f"DTYPE_{dtype.upper()}"
    assert_matches(node, expected)
    # Decoded correctly, the half-precision states are close to float32's.
    reference = client.forward(token_ids=ids, layers=[0, -1], pooling="mean")
    for sequence, per_layer in zip(node["sequences"], reference.hidden_states):
        for tensor, array in zip(sequence["tensors"], per_layer):
            assert tensor["abs_sum"] == pytest.approx(checksum(array)["abs_sum"], rel=1e-2)


def test_text_output_with_the_key_from_the_environment(service, forward_js):
    run = node_forward(service, forward_js, "--text", "Hello", "--layers", "-1", api_key=None,
                       env={"GEMMA_SERVE_API_KEY": ACME_KEY})
    assert run.returncode == 0, run.stderr
    assert "sequence 0: " in run.stdout and "layer 4: shape [" in run.stdout
    assert "sum=" in run.stdout and "abs_sum=" in run.stdout


def test_errors_print_the_status_code_and_exit_1(service, forward_js):
    run = node_forward(service, forward_js, "--ids", "1,2,999999",
                       "--proto-dir", str(REPO / "protos"))
    assert run.returncode == 1
    assert run.stderr.startswith("forward.js: INVALID_ARGUMENT: ")
    assert "outside [0, 1024)" in run.stderr
    run = node_forward(service, forward_js, "--ids", "1,2", api_key="not-a-key")
    assert run.returncode == 1 and run.stderr.startswith("forward.js: UNAUTHENTICATED: ")


DECODE = """
const { decodeInto, checksum, ITEM_BYTES } = require('./tensors');
const dtype = process.argv[1];
// The bytes from stdin, at an odd offset as gRPC's buffers may be.
const data = Buffer.concat([Buffer.alloc(1), require('fs').readFileSync(0)]).subarray(1);
const out = new Float32Array(data.length / ITEM_BYTES[dtype]);
decodeInto(dtype, data, out, 0);
const finite = out.filter(Number.isFinite);
console.log(JSON.stringify({ bits: Buffer.from(out.buffer).toString('base64'),
                             checksum: checksum(finite) }));
"""


@pytest.mark.parametrize("dtype,numpy_dtype", [("float16", np.float16),
                                               ("bfloat16", ml_dtypes.bfloat16)])
def test_every_half_precision_value_decodes_exactly(forward_js, dtype, numpy_dtype):
    """All 65536 bit patterns, against numpy; and the checksum, bit for bit."""
    patterns = np.arange(1 << 16, dtype="<u2")
    run = subprocess.run([NODE, "-e", DECODE, f"DTYPE_{dtype.upper()}"], input=patterns.tobytes(),
                         cwd=forward_js.parent, capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr.decode()
    answer = json.loads(run.stdout)
    got = np.frombuffer(base64.b64decode(answer["bits"]), "<f4")
    want = patterns.view(numpy_dtype).astype(np.float32)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view("<u4"), want[~nan].view("<u4"))  # -0.0 too
    assert answer["checksum"] == checksum(want[np.isfinite(want)])
