"""PEFT archives: what UploadAdapter accepts as a PEFT adapter, and refuses."""

import gzip
import io
import tarfile

import pytest

from coordinator import peft_archive
from coordinator.errors import InvalidArgument
from gemma_core import peft_format

FILES = {"adapter_config.json": b'{"peft_type": "LORA"}',
         "adapter_model.safetensors": b"weights"}


class Special:
    """A member that is not a regular file: a link or a device."""

    def __init__(self, type):
        self.type = type


def archive_of(members, compress=False):
    """A tar archive of (name, bytes or Special) members."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            if isinstance(content, bytes):
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
            else:
                info.type, info.linkname = content.type, "/etc/passwd"
                tar.addfile(info)
    data = buffer.getvalue()
    return gzip.compress(data) if compress else data


def unpack(tmp_path, data, max_bytes=1 << 20):
    path = tmp_path / "upload"
    path.write_bytes(data)
    into = tmp_path / "into"
    into.mkdir()
    peft_archive.unpack(path, into, max_bytes)
    return {p.name: p.read_bytes() for p in into.iterdir()}


def test_its_file_names_are_gemma_cores():
    assert peft_archive.MEMBERS == (peft_format.CONFIG_FILE, peft_format.WEIGHTS_FILE)


@pytest.mark.parametrize("layout", ["packed", "top level", "gzip", "dot slash"])
def test_accepted_layouts_give_the_two_files(tmp_path, layout):
    data = {"packed": lambda: peft_archive.pack(FILES, "my-adapter"),
            "top level": lambda: archive_of(list(FILES.items()) + [("README.md", b"hi")]),
            "gzip": lambda: archive_of([(f"a/{k}", v) for k, v in FILES.items()], True),
            "dot slash": lambda: archive_of([(f"./{k}", v) for k, v in FILES.items()])}[layout]()
    assert unpack(tmp_path, data) == FILES


def test_packing_is_deterministic():
    assert peft_archive.pack(FILES, "x") == peft_archive.pack(dict(reversed(FILES.items())), "x")


@pytest.mark.parametrize("members, reason", [
    ([("adapter_config.json", b"{}")], "lacks adapter_model.safetensors"),
    (list(FILES.items()) + [("evil.py", b"")], "'evil.py' is not one of its files"),
    (list(FILES.items()) + [("../adapter_config.json", b"")], "outside the archive"),
    ([("/abs/adapter_config.json", b"")], "outside the archive"),
    ([("a/../../adapter_config.json", b"")], "outside the archive"),
    ([("adapter_config.json", Special(tarfile.SYMTYPE)), ("adapter_model.safetensors", b"")],
     "not a regular file"),
    ([("adapter_config.json", Special(tarfile.LNKTYPE)), ("adapter_model.safetensors", b"")],
     "not a regular file"),
    ([("adapter_config.json", Special(tarfile.CHRTYPE)), ("adapter_model.safetensors", b"")],
     "not a regular file"),
    (list(FILES.items()) + [("adapter_config.json", b"{}")], "twice"),
    ([(f"a/{k}", v) for k, v in FILES.items()] + [("b/README.md", b"")], "several top-level"),
    ([("a/b/adapter_config.json", b"")], "not one of its files"),
])
def test_refused_members_are_named(tmp_path, members, reason):
    with pytest.raises(InvalidArgument, match=reason):
        unpack(tmp_path, archive_of(members))
    assert not list((tmp_path / "into").iterdir())  # nothing written


@pytest.mark.parametrize("data", [b"", b"not a tar archive at all" * 40,
                                  gzip.compress(b"x" * 2000)[:-30]])
def test_what_is_not_an_archive_is_refused(tmp_path, data):
    with pytest.raises(InvalidArgument, match="not a readable tar archive"):
        unpack(tmp_path, data)


def test_content_over_the_limit_is_refused_before_it_is_read(tmp_path):
    big = {**FILES, "adapter_model.safetensors": b"\0" * 5000}
    data = archive_of([(k, v) for k, v in big.items()], compress=True)
    assert len(data) < 1000
    with pytest.raises(InvalidArgument, match="more than the 4096 byte limit"):
        unpack(tmp_path, data, max_bytes=4096)


def test_tar_of_the_directory_contents_with_dot_entries_is_accepted(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for name, data in FILES.items():
        (source / name).write_bytes(data)
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:  # as `tar -C src -cf a.tar .` makes it
        tar.add(source, arcname=".")
    assert unpack(tmp_path, archive.read_bytes()) == FILES


def test_endless_tiny_headers_are_refused_at_the_cap(tmp_path):
    members = [(f"a/README.md", b"")] * 5000
    data = archive_of(members, compress=True)
    with pytest.raises(InvalidArgument, match="README.md twice|more than 16 members"):
        unpack(tmp_path, data)


def test_a_decompression_bomb_stops_at_the_limit(tmp_path):
    # One member claiming a huge size: refused on its header, before reading.
    data = archive_of([("adapter_config.json", b"{}"),
                       ("adapter_model.safetensors", b"\0" * (3 << 20))], compress=True)
    assert len(data) < 10_000
    with pytest.raises(InvalidArgument, match="limit"):
        unpack(tmp_path, data, max_bytes=1 << 20)
