"""replacing_file: the one write-fsync-rename every store uses."""

import errno
import os
import threading

import pytest

from coordinator import durable_files
from coordinator.durable_files import replacing_file


@pytest.fixture()
def synced(monkeypatch):
    """Paths fsynced, files and directories, in order."""
    events = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(
        ("file", os.readlink(f"/proc/self/fd/{fd}"))) or real_fsync(fd))
    monkeypatch.setattr(durable_files, "fsync_dir",
                        lambda path: events.append(("dir", str(path))))
    return events


def test_the_data_is_fsynced_before_the_rename_and_the_directory_after(tmp_path, synced):
    (tmp_path / "a.json").write_bytes(b"old")
    with replacing_file(tmp_path / "a.json", tmp_path / "a.tmp") as out:
        out.write(b"new")
    assert (tmp_path / "a.json").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["a.json"]
    assert synced == [("file", str(tmp_path / "a.tmp")), ("dir", str(tmp_path))]


def test_not_durable_fsyncs_nothing(tmp_path, synced):
    with replacing_file(tmp_path / "a.json", tmp_path / "a.tmp", durable=False) as out:
        out.write(b"new")
    assert (tmp_path / "a.json").read_bytes() == b"new" and synced == []


@pytest.mark.parametrize("durable", [True, False])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, durable):
    (tmp_path / "a.json").write_bytes(b"old")
    with pytest.raises(OSError, match="No space"):
        with replacing_file(tmp_path / "a.json", tmp_path / "a.tmp", durable=durable) as out:
            out.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (tmp_path / "a.json").read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["a.json"]


def test_a_refused_file_is_removed_and_admit_runs_under_the_guard(tmp_path):
    guard = threading.Lock()
    seen = []

    def admit(written):
        seen.append((written.read_bytes(), guard.locked()))
        raise ValueError("over quota")

    with pytest.raises(ValueError, match="over quota"):
        with replacing_file(tmp_path / "a.json", tmp_path / "a.tmp", admit=admit,
                            guard=guard) as out:
            out.write(b"new")
    assert seen == [(b"new", True)] and os.listdir(tmp_path) == []


def test_writing_over_an_existing_temporary(tmp_path):
    """mode "r+b" writes into the file's own blocks (the journal's reserve);
    with no such file it raises FileNotFoundError and creates nothing."""
    (tmp_path / "a.final").write_bytes(b"x" * 64)
    with replacing_file(tmp_path / "a.json", tmp_path / "a.final", mode="r+b") as out:
        out.write(b"record")
        out.truncate()
    assert (tmp_path / "a.json").read_bytes() == b"record"
    with pytest.raises(FileNotFoundError):
        with replacing_file(tmp_path / "b.json", tmp_path / "b.final", mode="r+b") as out:
            out.write(b"record")
    assert sorted(os.listdir(tmp_path)) == ["a.json"]
