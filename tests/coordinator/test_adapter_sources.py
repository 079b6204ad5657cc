"""fetch_adapter: a RegisterAdapter source copied into staging; local paths
only under the allowed root, nothing outside it opened; downloads that
cannot work fail at once, saying how to supply the files instead."""

import os
import shutil
import threading
import time

import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

from coordinator import adapter_sources
from coordinator.adapter_sources import PEFT_FILES, fetch_adapter
from coordinator.errors import (FailedPrecondition, InvalidArgument, NotFound, PermissionDenied,
                                ResourceExhausted)
from fixture_support import FIXTURES

PEFT = FIXTURES / "hf_gemma2_tiny_peft" / "peft_all"
LIMIT = 1 << 30


@pytest.fixture()
def root(tmp_path):
    """tmp/root/team/run7: a PEFT adapter with a README beside its files."""
    shutil.copytree(PEFT, tmp_path / "root" / "team" / "run7")
    (tmp_path / "root" / "team" / "run7" / "README.md").write_text("not an adapter file")
    return tmp_path / "root"


@pytest.fixture()
def into(tmp_path):
    (tmp_path / "staging").mkdir()
    return tmp_path / "staging"


@pytest.fixture()
def outside(tmp_path):
    """tmp/outside: a PEFT adapter whose adapter_config.json is a FIFO, which
    blocks whoever opens it for reading without O_NONBLOCK."""
    shutil.copytree(PEFT, tmp_path / "outside")
    (tmp_path / "outside" / "adapter_config.json").unlink()
    os.mkfifo(tmp_path / "outside" / "adapter_config.json")
    return tmp_path / "outside"


@pytest.fixture()
def opened(monkeypatch):
    """Every path os.open is asked for during the test, resolved."""
    paths, real_open = [], os.open

    def recording(path, flags, mode=0o777, *, dir_fd=None):
        base = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else ""
        paths.append(os.path.realpath(os.path.join(base, os.fspath(path))))
        return real_open(path, flags, mode, dir_fd=dir_fd)
    monkeypatch.setattr(os, "open", recording)
    return paths


def fetch(source, into, root, max_bytes=LIMIT):
    """fetch_adapter on a daemon thread: a test that would block on a FIFO fails."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fetch_adapter(source, into, root, max_bytes)
        except BaseException as error:  # noqa: BLE001 - re-raised below
            outcome["error"] = error
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), f"fetch_adapter({source!r}) blocked"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def assert_peft_copy(into):
    assert sorted(os.listdir(into)) == sorted(PEFT_FILES)  # the README left behind
    for name in PEFT_FILES:
        assert (into / name).read_bytes() == (PEFT / name).read_bytes()


@pytest.mark.parametrize("form", ["absolute", "relative", "file-url"])
def test_a_peft_directory_under_the_root_is_copied_without_other_files(root, into, form):
    source = {"absolute": str(root / "team" / "run7"), "relative": "team/run7",
              "file-url": f"file://{root}/team/run7"}[form]
    assert fetch(source, into, root) == (into, "peft")
    assert_peft_copy(into)


@pytest.mark.parametrize("name,fmt", [("a.lora.h5", "lora.h5"), ("b.safetensors", "safetensors")])
def test_adapter_files_are_copied_with_their_format(root, into, name, fmt):
    (root / "team" / name).write_bytes(b"adapter bytes " + name.encode())
    path, got = fetch(f"team/{name}", into, root)
    assert got == fmt and path.parent == into and path.name.endswith(name.split(".", 1)[1])
    assert path.read_bytes() == b"adapter bytes " + name.encode()
    assert os.listdir(into) == [path.name]


def test_other_files_and_incomplete_directories_are_refused(root, into):
    (root / "team" / "weights.bin").write_bytes(b"x")
    with pytest.raises(InvalidArgument, match=r"\.lora\.h5.*\.safetensors.*hf://"):
        fetch("team/weights.bin", into, root)
    (root / "team" / "run7" / "adapter_model.safetensors").unlink()
    with pytest.raises(InvalidArgument, match="lacks.*adapter_model.safetensors"):
        fetch("team/run7", into, root)
    assert os.listdir(into) == []


@pytest.mark.parametrize("source", ["{outside}", "file://{outside}", "../outside",
                                    "team/../../outside", "{root}/../outside"])
def test_paths_outside_the_root_are_refused_unread(root, into, outside, opened, tmp_path,
                                                   source):
    source = source.format(outside=outside, root=root)
    with pytest.raises(PermissionDenied) as error:
        fetch(source, into, root)
    assert str(root) not in str(error.value).replace(source, "")  # the root stays private
    assert not [p for p in opened if p.startswith(str(outside))]
    assert os.listdir(into) == []


def test_symlinks_leading_out_of_the_root_are_refused_unread(root, into, outside, opened):
    (root / "link").symlink_to(outside)  # the adapter directory itself
    (root / "parent").symlink_to(outside.parent)  # a directory above it
    shutil.copytree(PEFT, root / "inner")
    (root / "inner" / "adapter_config.json").unlink()
    (root / "inner" / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    for source in ("link", "parent/outside", "inner", f"file://{root}/inner"):
        with pytest.raises(PermissionDenied, match="leads outside"):
            fetch(source, into, root)
    assert not [p for p in opened if p.startswith(str(outside))]
    assert os.listdir(into) == []


def test_symlinks_within_the_root_are_followed(root, into):
    (root / "alias").symlink_to(root / "team" / "run7")
    assert fetch("alias", into, root) == (into, "peft")
    assert_peft_copy(into)


def test_fifos_inside_the_root_are_refused_without_blocking(root, into):
    os.mkfifo(root / "pipe.safetensors")
    with pytest.raises(InvalidArgument, match="neither a directory nor a file"):
        fetch("pipe.safetensors", into, root)
    (root / "team" / "run7" / "adapter_config.json").unlink()
    os.mkfifo(root / "team" / "run7" / "adapter_config.json")
    with pytest.raises(InvalidArgument, match="adapter_config.json is not a regular file"):
        fetch("team/run7", into, root)
    assert os.listdir(into) == []


@pytest.mark.parametrize("source", ["team/run7", "/abs/run7", "file:///abs/run7"])
def test_without_a_root_no_local_path_is_read(into, opened, source):
    with pytest.raises(FailedPrecondition, match="--adapter-source-root.*adapters upload"):
        fetch(source, into, None)
    assert opened == []


@pytest.mark.parametrize("source", ["s3://bucket/a", "http://host/a", "gs://b/a", "xyz://a", ""])
def test_other_schemes_and_empty_sources_are_refused_unread(root, into, opened, source):
    with pytest.raises(InvalidArgument, match=r"source: .*hf://org/repo.*kaggle://"):
        fetch(source, into, root)
    assert opened == []


def test_files_above_the_limit_are_refused(root, into):
    total = sum((PEFT / name).stat().st_size for name in PEFT_FILES)
    with pytest.raises(ResourceExhausted, match=f"limit of {total - 1} bytes"):
        fetch("team/run7", into, root, max_bytes=total - 1)
    assert fetch("team/run7", into, root, max_bytes=total) == (into, "peft")


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, the Hub at a port nothing listens on."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")
    return tmp_path / "hf-cache"


def test_hf_with_the_hub_unreachable_fails_at_once_saying_what_to_do(hf_cache, into, tmp_path):
    started = time.monotonic()
    with pytest.raises(FailedPrecondition) as error:
        fetch("hf://some-org/some-adapter@main/sub", into, None)
    assert time.monotonic() - started < 5
    message = str(error.value)
    assert "hf://some-org/some-adapter@main/sub" in message and "unreachable" in message
    assert "gemma-client adapters upload NAME DIR" in message
    assert "--adapter-source-root" in message and str(tmp_path) not in message


def test_hf_offline_and_not_cached_fails_naming_hf_hub_offline(hf_cache, into, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FailedPrecondition, match="HF_HUB_OFFLINE.*adapters upload"):
        fetch("hf://some-org/some-adapter", into, None)


def test_hf_never_serves_the_servers_own_cache(hf_cache, into, monkeypatch):
    """A repository in the server's Hugging Face cache (perhaps private, read
    with the operator's token) is not handed out: sources are downloaded
    anonymously, so with the Hub offline this fails."""
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_cache / "models--some-org--some-adapter"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / commit / "sub").mkdir(parents=True)
    for name in PEFT_FILES:
        shutil.copy(PEFT / name, repo / "blobs" / name)
        (repo / "snapshots" / commit / "sub" / name).symlink_to(f"../../../blobs/{name}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    with pytest.raises(FailedPrecondition, match="HF_HUB_OFFLINE"):
        fetch("hf://some-org/some-adapter/sub", into, None)
    assert not list(into.iterdir())


@pytest.mark.parametrize("source", ["hf://no-slash", "hf://org/repo/../x", "hf://org//x"])
def test_malformed_hf_sources_are_refused(hf_cache, into, source):
    with pytest.raises(InvalidArgument, match="source"):
        fetch(source, into, None)


@pytest.fixture()
def no_kaggle_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle-config"))
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub-cache"))


def test_kaggle_without_credentials_fails_saying_what_to_do(no_kaggle_credentials, into,
                                                            monkeypatch):
    monkeypatch.setattr(adapter_sources, "reachable", lambda url: pytest.fail("no check"))
    with pytest.raises(FailedPrecondition) as error:
        fetch("kaggle://someone/adapters/transformers/run7/2", into, None)
    message = str(error.value)
    assert "kaggle://someone/adapters/transformers/run7/2" in message
    assert "KAGGLE_USERNAME" in message and "gemma-client adapters upload NAME DIR" in message


@pytest.mark.parametrize("source,subfolder", [
    ("kaggle://someone/adapters/transformers/run7/2", None),
    ("kaggle://someone/adapters/transformers/run7/2/sub/dir", "sub/dir")])
def test_kaggle_served_from_the_kagglehub_cache(no_kaggle_credentials, into, source,
                                                subfolder):
    from kagglehub.cache import Cache
    from kagglehub.handle import parse_model_handle

    handle = parse_model_handle("someone/adapters/transformers/run7/2")
    cache = Cache()
    shutil.copytree(PEFT, os.path.join(cache.get_path(handle), subfolder or ""))
    cache.mark_as_complete(handle)
    assert fetch(source, into, None) == (into, "peft")
    assert_peft_copy(into)


def test_kaggle_subfolders_cannot_climb_out(no_kaggle_credentials, into):
    with pytest.raises(InvalidArgument, match="'..' part"):
        fetch("kaggle://someone/adapters/transformers/run7/2/../../x", into, None)


def http_error(kind, message):
    from types import SimpleNamespace
    return kind(message, response=SimpleNamespace(headers={}, request=None))


@pytest.mark.parametrize("raised,shown,code", [
    (lambda: http_error(GatedRepoError, "403 Cannot access gated repo org/x."),
     "GatedRepoError", NotFound),
    (lambda: http_error(RepositoryNotFoundError, "404 Repository Not Found"),
     "RepositoryNotFoundError", NotFound),
    (lambda: OSError(5, "I/O error", "/srv/private/hf-cache/blob"), "OSError",
     FailedPrecondition)])
def test_hf_download_errors_say_what_to_do_and_hide_server_paths(hf_cache, into, monkeypatch,
                                                                 raised, shown, code):
    import huggingface_hub

    def fail(*args, **kwargs):
        raise raised()
    monkeypatch.setattr(adapter_sources, "reachable", lambda url: True)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", fail)
    with pytest.raises(code) as error:
        fetch("hf://org/x", into, None)
    message = str(error.value)
    assert shown in message and "adapters upload" in message
    assert "/srv/private" not in message
