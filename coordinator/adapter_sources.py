"""Where RegisterAdapter's `source` points: copied into a staging directory, safely.

Example:
    >>> path, fmt = fetch_adapter("team/run7", staging, Path("/srv/adapters"), 1 << 30)
    >>> fmt  # /srv/adapters/team/run7 held adapter_config.json and adapter_model.safetensors
    'peft'

Downloads (hf://, kaggle://) check first that they can work (not offline, the
host reachable, Kaggle credentials set), so with no network they fail at once
and say how to supply the files instead. Local paths are read only under the
operator's --adapter-source-root; nothing outside it is opened, and error
messages show only what the caller sent, never the server's own paths.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import stat
import urllib.parse
from pathlib import Path, PurePosixPath

from coordinator.errors import (FailedPrecondition, InvalidArgument, NotFound,
                                PermissionDenied, ResourceExhausted)
from coordinator.peft_archive import MEMBERS
from gemma_core.preset_source import reachable

log = logging.getLogger("gemma_serve.adapter_sources")

PEFT_FILES = MEMBERS
_FILE_FORMATS = {".lora.h5": "lora.h5", ".safetensors": "safetensors"}
_HF_FORM = "hf://org/repo[@revision][/subfolder]"
_KAGGLE_FORM = "kaggle://owner/model/framework/variation[/version][/subfolder]"
_ACCEPTED = (f"{_HF_FORM}, {_KAGGLE_FORM}, or a path under the server's "
             "--adapter-source-root (absolute, file:///abs/path, or relative to the root) "
             "naming a PEFT adapter directory, a .lora.h5 file or a .safetensors file")
_UPLOAD = ("upload it with `gemma-client adapters upload NAME DIR`, or ask the operator "
           "to place it under the server's --adapter-source-root.")
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: should a FIFO get past the lstat check, opening it cannot block.
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def fetch_adapter(source: str, into: Path, allowed_root: Path | None,
                  max_bytes: int) -> tuple[Path, str]:
    """Copies the adapter `source` names into the existing empty directory `into`;
    returns (where the copy is, its format). Format is "peft" (the copy is a
    directory holding exactly adapter_config.json and adapter_model.safetensors),
    "lora.h5" (a keras_hub .lora.h5 file) or "safetensors" (gemma-serve's own
    adapter safetensors file). On an error `into` may hold partial files.

    Raises:
        InvalidArgument: a source that is none of the accepted forms.
        PermissionDenied: a path outside `allowed_root`, or leading out of it.
        FailedPrecondition: no root configured, no network, no credentials,
            or a download that failed.
        ResourceExhausted: the adapter's files exceed `max_bytes` in all.
    """
    if not source:
        raise InvalidArgument("source", f"it is empty; use {_ACCEPTED}.")
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", source)
    if scheme and scheme[1] == "hf":
        return _fetch_hf(source, into, max_bytes)
    if scheme and scheme[1] == "kaggle":
        # The download is then read like a local root: its files are checked alike.
        return _copy_local(source, *_kaggle_download(source), into, max_bytes)
    if scheme and scheme[1] != "file":
        raise InvalidArgument("source", f"{scheme[1]}:// sources are not read by this "
                                        f"server; use {_ACCEPTED}.")
    if allowed_root is None:
        raise FailedPrecondition(
            "source: this server reads no local adapter paths (its operator did not set "
            f"--adapter-source-root); use an hf:// or kaggle:// source, or {_UPLOAD}")
    path = source
    if scheme:
        url = urllib.parse.urlparse(source)
        if url.netloc not in ("", "localhost"):
            raise InvalidArgument("source", "a file:// source is file:///absolute/path.")
        path = urllib.parse.unquote(url.path)
    return _copy_local(source, os.path.realpath(allowed_root), path, into, max_bytes)


def _copy_local(source: str, root: str, path: str, into: Path,
                max_bytes: int) -> tuple[Path, str]:
    """Copies `path` (absolute, or relative to the real directory `root`)."""
    if ".." in PurePosixPath(path).parts:
        raise PermissionDenied(f"source: {source!r} climbs out with '..'; name a path "
                               "under the server's --adapter-source-root.")
    real = _inside(root, os.path.join(root, path), source)
    try:
        mode = os.lstat(real).st_mode  # `real` has no symlinks left; nothing is opened
    except (FileNotFoundError, NotADirectoryError):
        raise NotFound(f"source: {source!r} does not exist.") from None
    if stat.S_ISDIR(mode):
        missing = [n for n in PEFT_FILES if not os.path.lexists(os.path.join(real, n))]
        if missing:
            raise InvalidArgument("source", f"the directory {source!r} lacks {missing}; "
                                            f"a PEFT adapter directory holds {list(PEFT_FILES)}.")
        wanted = [(os.path.join(real, n), into / n) for n in PEFT_FILES]
        where, fmt = into, "peft"
    else:
        suffix = next((s for s in _FILE_FORMATS if real.endswith(s)), None)
        if suffix is None or not stat.S_ISREG(mode):
            raise InvalidArgument("source", f"{source!r} is neither a directory nor a file "
                                            f"ending {list(_FILE_FORMATS)}; use {_ACCEPTED}.")
        where, fmt = into / f"adapter{suffix}", _FILE_FORMATS[suffix]
        wanted = [(real, where)]
    with contextlib.ExitStack() as stack:
        opened = []
        for file, dest in wanted:
            fd, size = _open_regular(root, _inside(root, file, source), source)
            stack.callback(os.close, fd)
            opened.append((fd, size, dest))
        _copy_all(opened, max_bytes)
    return where, fmt


def _inside(root: str, path: str, source: str) -> str:
    """`path` with its symlinks resolved (read with lstat/readlink, never
    opened), which must lie in `root`."""
    real = os.path.realpath(path)
    if os.path.commonpath([real, root]) != root:
        raise PermissionDenied(f"source: {source!r} leads outside what the server may read "
                               "(for a path: its --adapter-source-root), maybe by a symlink.")
    return real


def _open_regular(root: str, real: str, source: str) -> tuple[int, int]:
    """(fd, size) of the regular file at `real`, opened one directory at a
    time from `root` with O_NOFOLLOW: a symlink swapped in after the realpath
    check cannot lead the open out of the root."""
    parts = PurePosixPath(os.path.relpath(real, root)).parts
    dir_fd = os.open(root, _DIR)
    try:
        for part in parts[:-1]:
            parent, dir_fd = dir_fd, os.open(part, _DIR, dir_fd=dir_fd)
            os.close(parent)
        if stat.S_ISREG(os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False).st_mode):
            fd = os.open(parts[-1], _FILE, dir_fd=dir_fd)
            status = os.fstat(fd)  # what was opened, not what lstat saw
            if stat.S_ISREG(status.st_mode):
                return fd, status.st_size
            os.close(fd)
    except OSError as error:  # a component swapped for a symlink, or removed
        log.warning("adapter source %r: %s", source, error)
        if error.errno == errno.EACCES:
            raise PermissionDenied(f"source: the server may not read {source!r} (its "
                                   "file permissions); ask the operator.") from None
        raise PermissionDenied(f"source: {source!r} changed while it was read.") from None
    finally:
        os.close(dir_fd)
    raise InvalidArgument("source", f"{source!r}: {parts[-1]} is not a regular file.")


def _copy_all(opened: list[tuple[int, int, Path]], max_bytes: int) -> None:
    """Copies each (fd, size, dest), refusing more than `max_bytes` in all,
    by the sizes first and again while reading (a file may still grow)."""
    if sum(size for _, size, _ in opened) > max_bytes:
        raise _too_big(max_bytes)
    left = max_bytes
    for fd, _, dest in opened:
        with open(dest, "xb") as out:
            while chunk := os.read(fd, 1 << 20):
                left -= len(chunk)
                if left < 0:
                    raise _too_big(max_bytes)
                out.write(chunk)


def _too_big(max_bytes: int) -> ResourceExhausted:
    return ResourceExhausted(f"source: the adapter's files exceed this server's limit "
                             f"of {max_bytes} bytes per adapter.")


def _hint(host: str) -> str:
    return f"download the adapter where {host} is reachable and {_UPLOAD}"


def _check_parts(source: str, parts: list[str], form: str) -> None:
    if any(part in ("", ".", "..") for part in parts):
        raise InvalidArgument("source", f"{source!r} has an empty, '.' or '..' part; "
                                        f"expected {form}.")


def _fetch_hf(source: str, into: Path, max_bytes: int) -> tuple[Path, str]:
    import huggingface_hub
    from huggingface_hub import constants, errors

    parts = source.removeprefix("hf://").split("/")
    name, _, revision = parts[1].partition("@") if len(parts) > 1 else ("", "", "")
    _check_parts(source, [parts[0], name, *parts[2:]], _HF_FORM)
    where = dict(repo_id=f"{parts[0]}/{name}", subfolder="/".join(parts[2:]) or None,
                 revision=revision or None)

    if constants.HF_HUB_OFFLINE:
        raise FailedPrecondition(f"source: {source!r} must be downloaded and HF_HUB_OFFLINE "
                                 f"is set on the server; {_hint('the Hub')}")
    if not reachable(constants.ENDPOINT):
        raise FailedPrecondition(f"source: {source!r} must be downloaded but the Hub "
                                 f"is unreachable from the server; {_hint('the Hub')}")
    # Anonymous (token=False) and into this call's own scratch directory: the
    # server's HF_TOKEN and its shared cache would hand any tenant private or
    # gated repositories the operator can read.
    download = into / ".download"
    try:
        sizes = [huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(
            filename=n, **where), token=False).size or 0 for n in PEFT_FILES]
        if sum(sizes) > max_bytes:  # refused before anything is downloaded
            raise _too_big(max_bytes)
        files = [huggingface_hub.hf_hub_download(filename=n, **where, token=False,
                                                 cache_dir=download) for n in PEFT_FILES]
    except ResourceExhausted:
        raise
    except errors.HFValidationError as error:
        raise InvalidArgument("source", f"{source!r}: {error}") from None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError,
            errors.EntryNotFoundError) as error:
        raise NotFound(f"source: {source!r}: {type(error).__name__}: no such public "
                       f"repository, revision or file (a PEFT adapter holds "
                       f"{' and '.join(PEFT_FILES)}); private and gated repositories are "
                       f"not read. {_hint('the Hub').capitalize()}") from None
    except Exception as error:  # network errors of any kind, HTTP errors
        log.warning("adapter source %r: %s", source, error)
        # An HTTP error's text (URL, status, the Hub's reason) holds no server path.
        detail = error if isinstance(error, errors.HfHubHTTPError) else type(error).__name__
        raise FailedPrecondition(f"source: {source!r} could not be downloaded ({detail}); "
                                 f"{_hint('the Hub')}") from None
    # The cache's snapshot files are symlinks to its blobs: the cache is the root.
    try:
        return _copy_local(source, os.path.realpath(download),
                           os.path.abspath(os.path.dirname(files[0])), into, max_bytes)
    finally:
        shutil.rmtree(download, ignore_errors=True)


def _kaggle_download(source: str) -> tuple[str, str]:
    """(the real path of the kagglehub directory holding `source`'s model,
    the subfolder `source` names in it)."""
    import kagglehub
    from kagglehub import cache, config
    from kagglehub.handle import parse_model_handle

    parts = source.removeprefix("kaggle://").split("/")
    _check_parts(source, parts, _KAGGLE_FORM)
    # The fifth part is the version when it is a number, else the subfolder's first.
    split = 5 if len(parts) > 4 and parts[4].isdigit() else 4
    handle = "/".join(parts[:split])
    try:
        parsed = parse_model_handle(handle)
    except Exception as error:  # kagglehub raises plain ValueErrors here.
        raise InvalidArgument("source", f"{source!r} is not {_KAGGLE_FORM}: {error}") from None
    downloaded = parsed.is_versioned() and cache.Cache().load_from_cache(parsed)
    if not downloaded:
        if config.get_kaggle_credentials() is None:
            raise FailedPrecondition(
                f"source: {source!r} is not in the server's kagglehub cache and the server "
                "has no Kaggle credentials (KAGGLE_USERNAME and KAGGLE_KEY, or "
                f"kaggle.json); {_hint('Kaggle')}")
        if not reachable("https://www.kaggle.com"):
            raise FailedPrecondition(f"source: {source!r} must be downloaded but Kaggle is "
                                     f"unreachable from the server; {_hint('Kaggle')}")
        try:  # the adapter's two files, not the whole model
            files = [kagglehub.model_download(handle, path="/".join([*parts[split:], n]))
                     for n in PEFT_FILES]
            downloaded = os.path.dirname(files[0])
            parts = parts[:split]
        except Exception as error:  # Network, auth and 404s all surface here.
            log.warning("adapter source %r: %s", source, error)
            raise FailedPrecondition(f"source: {source!r} could not be downloaded "
                                     f"({type(error).__name__}); {_hint('Kaggle')}") from None
    return os.path.realpath(downloaded), "/".join(parts[split:])
