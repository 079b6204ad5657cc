"""A PEFT adapter directory as one tar archive: how UploadAdapter and
ExportAdapter carry its two files over one byte stream, from any language
(every platform has a tar writer).

The archive holds adapter_config.json and adapter_model.safetensors, at its
top level or inside one top-level directory (as `tar -cf a.tar my-adapter/`
makes it), optionally gzip-compressed; a README.md, which PEFT writes next to
them, may come along and is skipped. Anything else is refused by name.
"""

from __future__ import annotations

import gzip
import io
import posixpath
import tarfile
import zlib
from pathlib import Path

from coordinator.errors import InvalidArgument

# gemma_core.peft_format's CONFIG_FILE and WEIGHTS_FILE, named here so that the
# client, which packs archives, does not load gemma_core (and JAX) to do it;
# tests/coordinator/test_peft_archive.py checks they agree.
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
MEMBERS = (CONFIG_FILE, WEIGHTS_FILE)
_SKIPPED = ("README.md",)
# A PEFT directory has two files and maybe a README; a few more headers
# (a top directory, PAX records) are fine, thousands are an attack.
_MAX_MEMBERS = 16
# Room for tar headers and padding around the files' own bytes.
_HEADER_ALLOWANCE = 64 << 10
_FORM = (f"a tar archive (optionally gzip) of a PEFT adapter directory: {CONFIG_FILE} and "
         f"{WEIGHTS_FILE} at its top level or in one top-level directory")


def pack(files: dict[str, bytes], directory: str) -> bytes:
    """A tar archive of `files` (name -> bytes) inside `directory`, built in
    memory; the same adapter always packs to the same bytes.

    Example:
    >>> archive = pack(adapter.peft_files(config), "my-adapter")
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        folder = tarfile.TarInfo(directory)
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        archive.addfile(folder)
        for name, payload in sorted(files.items()):
            member = tarfile.TarInfo(f"{directory}/{name}")
            member.size, member.mode = len(payload), 0o644
            archive.addfile(member, io.BytesIO(payload))
    return buffer.getvalue()


def unpack(archive: Path, into: Path, max_bytes: int) -> Path:
    """Writes the archive's two adapter files into the directory `into`
    (which must exist) and returns it; reads nothing else out of it.

    Raises:
        InvalidArgument: not a tar archive, a member that is not one of the
            adapter's files (a link, a device, a path that climbs out, an
            extra file), a file missing or repeated, or more than
            `max_bytes` of content.
    """
    try:
        with open(archive, "rb") as raw, tarfile.open(
                fileobj=_Capped(raw, max_bytes + _HEADER_ALLOWANCE), mode="r|*") as tar:
            payloads = _read_members(tar, max_bytes)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise _refused(f"it is not a readable tar archive ({type(error).__name__})") from None
    # Outside the try: a write that fails is our disk's trouble, not the archive's.
    for name, payload in payloads.items():
        (into / name).write_bytes(payload)
    return into


def _read_members(tar: tarfile.TarFile, max_bytes: int) -> dict[str, bytes]:
    """File name -> content of the adapter's files, read as the stream goes
    (a member is checked before the next header is read, so an archive of
    endless tiny headers is refused at the first that does not belong)."""
    payloads: dict[str, bytes] = {}
    top, flat, seen, total = None, False, set(), 0
    for count, member in enumerate(tar):
        if count >= _MAX_MEMBERS:
            raise _refused(f"it holds more than {_MAX_MEMBERS} members")
        parts = _parts(member)
        if not parts:  # "." or "./": the top level itself
            continue
        if len(parts) == 2 or member.isdir():  # inside, or the one, top-level directory
            if top is None and not flat:
                top = parts[0]
            elif parts[0] != top:
                raise _refused(f"it holds files under several top-level directories "
                               f"({top!r}, {parts[0]!r})" if top else
                               f"member {member.name!r} is not one of its files")
            if member.isdir() and len(parts) == 1:
                continue
        flat = flat or len(parts) == 1
        name = parts[-1]
        if len(parts) > 2 or (len(parts) == 1 and top is not None) or \
                name not in MEMBERS + _SKIPPED:
            raise _refused(f"member {member.name!r} is not one of its files")
        if not member.isreg():
            raise _refused(f"member {member.name!r} is not a regular file (links and "
                           "devices are refused)")
        if name in seen:
            raise _refused(f"it holds {name} twice")
        seen.add(name)
        if name in MEMBERS:
            total += member.size
            if total > max_bytes:
                raise _refused(f"its files hold more than the {max_bytes} byte limit")
            payloads[name] = tar.extractfile(member).read(member.size)
    missing = [name for name in MEMBERS if name not in payloads]
    if missing:
        raise _refused(f"it lacks {', '.join(missing)}")
    return payloads


class _Capped(io.RawIOBase):
    """A file read through, refusing to give more than `limit` bytes: the
    decompressed stream of a gzip archive stays bounded whatever it claims."""

    def __init__(self, raw, limit: int):
        self._raw, self._left = raw, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._left <= 0:
            raise _refused("it holds more than its files' limit in all")
        data = self._raw.read(min(len(buffer), self._left))
        buffer[:len(data)] = data
        self._left -= len(data)
        return len(data)


def _parts(member: tarfile.TarInfo) -> tuple[str, ...]:
    """The member's path as parts (none for the top level itself, "." or
    "./"); a path that is absolute or climbs (`..`) is refused, before
    anything is read."""
    path = member.name
    normal = posixpath.normpath(path) if path else "."
    if normal == ".":
        return ()
    if normal.startswith("/") or normal == ".." or normal.startswith("../") or "\\" in normal:
        raise _refused(f"member {path!r} has a path outside the archive's directory")
    return tuple(normal.split("/"))


def _refused(reason: str) -> InvalidArgument:
    return InvalidArgument("adapter", f"the upload is not a PEFT adapter archive: {reason}. "
                                      f"Send {_FORM}.")
