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


def test_score_prints_json_equal_to_the_library_and_the_local_model(service, client,
                                                                    local_model):
    """Text candidates (one token each) read at the last position, as a
    ShieldGemma verdict is read; equal to the head on the local model."""
    import json

    from gemma_core import token_scores

    run = gemma_client(service, "score", "--text", "hello world", "--token-logprobs",
                       "--top-k", "3", "--positions", "0,-1", "--candidate", "A",
                       "--candidate", "B")
    assert run.returncode == 0, run.stderr
    printed = json.loads(run.stdout)
    model, tokenizer = local_model
    ids = tokenizer.tokenize("hello world", add_bos=True)
    assert printed["candidate_ids"] == [tokenizer.tokenize(t, add_bos=False)[0] for t in "AB"]
    (sequence,) = printed["sequences"]
    assert sequence["token_ids"] == ids
    inputs = {"token_ids": np.array([ids]), "padding_mask": np.ones((1, len(ids)), "int32")}
    final = model(inputs)
    want = np.asarray(token_scores.token_logprobs(model, final, inputs["token_ids"]))[0]
    np.testing.assert_allclose(sequence["token_logprobs"], want, atol=1e-4)
    chosen, probs = token_scores.candidates(model, final, np.array([len(ids) - 1]),
                                            np.array([printed["candidate_ids"]]))
    np.testing.assert_allclose(sequence["candidate_probs"], np.asarray(probs)[0], atol=1e-5)
    assert [t["position"] for t in sequence["top_tokens"]] == [0, len(ids) - 1]
    library = client.score(texts=["hello world"], top_k=3, top_k_positions=[0, -1])
    for printed_top, (_, top_ids, _) in zip(sequence["top_tokens"],
                                            library.sequences[0].top_tokens):
        assert printed_top["ids"] == top_ids.tolist()
    bad = gemma_client(service, "score", "--text", "hello world", "--candidate", "Yes")
    assert bad.returncode != 0 and "INVALID_ARGUMENT" in bad.stderr
    assert "exactly one token" in bad.stderr
