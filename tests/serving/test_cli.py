"""The gemma-client command against the running service."""

import pathlib
import subprocess
import sys

import numpy as np

from service_support import ACME_KEY

BIN = pathlib.Path(sys.executable).parent


def gemma_client(service, *args):
    return subprocess.run([BIN / "gemma-client", "--target", service.address,
                           "--api-key", ACME_KEY, *args],
                          capture_output=True, text=True, timeout=120)


def test_forward_prints_shapes_and_saves_arrays(service, client, tmp_path):
    out = tmp_path / "states.npz"
    run = gemma_client(service, "forward", "--text", "Hello there", "--layers", "0,-1",
                       "--save", str(out))
    assert run.returncode == 0, run.stderr
    assert "layer 0: shape (" in run.stdout and "layer 4: shape (" in run.stdout
    saved = np.load(out)
    expected = client.forward(texts=["Hello there"], layers=[0, -1])
    np.testing.assert_array_equal(saved["seq0_layer4"], expected.hidden_states[0][1])


def test_save_as_npy_file_or_directory(service, client, tmp_path):
    one = tmp_path / "final.npy"
    run = gemma_client(service, "forward", "--ids", "2,5,7", "--pooling", "mean",
                       "--dtype", "bfloat16", "--save", str(one))
    assert run.returncode == 0, run.stderr
    expected = client.forward(token_ids=[[2, 5, 7]], pooling="mean", dtype="bfloat16")
    saved = np.load(one)
    assert saved.dtype == np.float32  # numpy files cannot name bfloat16
    np.testing.assert_array_equal(saved, expected.hidden_states[0][0].astype(np.float32))

    half = tmp_path / "half.NPY"
    run = gemma_client(service, "forward", "--ids", "2,5,7", "--dtype", "float16",
                       "--save", str(half))
    assert run.returncode == 0, run.stderr
    assert np.load(half).dtype == np.float16

    run = gemma_client(service, "forward", "--ids", "2,5,7", "--ids", "9", "--layers", "0,-1",
                       "--save", str(one))
    assert run.returncode != 0 and "holds one array" in run.stderr and ".npz" in run.stderr
    plain = tmp_path / "plain"
    plain.write_text("")
    for target, says in ((plain, "is not a directory"), (one / "x", "Not a directory"),
                         (tmp_path / "none" / "x.npz", "no directory")):
        run = gemma_client(service, "forward", "--ids", "2,5,7", "--save", str(target))
        assert run.returncode != 0 and says in run.stderr
        assert "request" not in run.stdout  # refused before the call

    directory = tmp_path / "states"
    run = gemma_client(service, "forward", "--ids", "2,5,7", "--ids", "9", "--layers", "0,-1",
                       "--save", str(directory))
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in directory.iterdir()) == [
        "seq0_layer0.npy", "seq0_layer4.npy", "seq1_layer0.npy", "seq1_layer4.npy"]
    expected = client.forward(token_ids=[[2, 5, 7], [9]], layers=[0, -1])
    np.testing.assert_array_equal(np.load(directory / "seq1_layer4.npy"),
                                  expected.hidden_states[1][1])


def test_errors_are_reported_with_their_code(service):
    run = gemma_client(service, "forward", "--ids", "1,2,999999")
    assert run.returncode != 0
    assert "INVALID_ARGUMENT" in run.stderr and "outside [0, 1024)" in run.stderr


def test_info(service):
    run = gemma_client(service, "info")
    assert run.returncode == 0 and '"random_weights": true' in run.stdout
