"""Turns a preset reference into a local directory, downloading if needed.

A reference is "default" (the built-in random-weight model), a built-in
preset name, a `kaggle://owner/model/framework/
variation/version` handle, an `hf://org/repo` repository, or a local
directory. Downloads go through kagglehub and huggingface_hub and their
caches; when a download cannot work (no network, no credentials) the error
says so at once instead of hanging, and says how to supply the files.
"""

from __future__ import annotations

import difflib
import os
import pathlib
import socket
import urllib.parse

from gemma_core.default_preset import DEFAULT_PRESET, ensure_default_preset
from gemma_core.errors import PresetError
from gemma_core.gemma_presets import GEMMA_PRESETS

_CONNECT_TIMEOUT_S = 5.0
_LOCAL_HINT = ("Download the preset on a machine with access and pass its "
               "directory instead, e.g. GemmaBackbone.from_preset('/path/to/preset').")


def resolve_preset(preset: str | os.PathLike) -> pathlib.Path:
    """Returns the local directory holding `preset`'s files."""
    text = os.fspath(preset)
    if text == DEFAULT_PRESET:
        return ensure_default_preset()
    if text.startswith("kaggle://"):
        return _kaggle_download(text, text)
    if text.startswith("hf://"):
        return _hf_download(text)
    if text in GEMMA_PRESETS:
        return _kaggle_download(GEMMA_PRESETS[text]["kaggle_handle"], text)
    path = pathlib.Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise PresetError(f"Preset '{text}' is a file; a preset is a directory "
                          "holding config.json and weights.")
    close = difflib.get_close_matches(text, GEMMA_PRESETS, n=3, cutoff=0.6)
    suggestion = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise PresetError(
        f"Unknown preset '{text}': not a built-in preset name, not a "
        f"kaggle:// or hf:// handle, and no such directory.{suggestion} "
        f"Built-in presets: {', '.join(sorted(GEMMA_PRESETS))}.")


def reachable(url: str) -> bool:
    """Whether a TCP connection to `url`'s host opens within 5 s: checked
    before a download so that, with no network, it fails at once instead of
    after the client's retries."""
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=_CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def _kaggle_download(handle: str, preset: str) -> pathlib.Path:
    import kagglehub
    from kagglehub import cache as kaggle_cache
    from kagglehub import config as kaggle_config
    from kagglehub.handle import parse_model_handle

    bare = handle.removeprefix("kaggle://")
    try:
        parsed = parse_model_handle(bare)
    except Exception as error:  # kagglehub raises plain ValueErrors here.
        raise PresetError(f"'{handle}' is not a Kaggle model handle "
                          "(kaggle://owner/model/framework/variation[/version]): "
                          f"{error}") from error
    if parsed.is_versioned():
        cached = kaggle_cache.Cache().load_from_cache(parsed)
        if cached:
            return pathlib.Path(cached)
    where = f"Preset '{preset}' ({handle})"
    if kaggle_config.get_kaggle_credentials() is None:
        raise PresetError(
            f"{where} is not in the kagglehub cache and no Kaggle credentials are "
            "set (KAGGLE_USERNAME and KAGGLE_KEY, or ~/.kaggle/kaggle.json); Gemma "
            f"weights need an account that accepted the license. {_LOCAL_HINT}")
    if not reachable("https://www.kaggle.com"):
        raise PresetError(f"{where} must be downloaded but www.kaggle.com is "
                          f"unreachable from here. {_LOCAL_HINT}")
    try:
        return pathlib.Path(kagglehub.model_download(bare))
    except Exception as error:  # Network, auth and 404s all surface here.
        raise PresetError(f"{where} could not be downloaded: {error}. {_LOCAL_HINT}") from error


def _hf_download(reference: str) -> pathlib.Path:
    import huggingface_hub
    from huggingface_hub import constants

    repo = reference.removeprefix("hf://").strip("/")
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
    if repo.count("/") != 1:
        raise PresetError(f"'{reference}' is not a Hugging Face repository; "
                          "expected hf://org/name[@revision].")
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "assets/**", "*.h5"]
    try:
        return pathlib.Path(huggingface_hub.snapshot_download(
            repo, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:  # Not cached (or partly): fall through to a download.
        pass
    where = f"Preset '{reference}'"
    if constants.HF_HUB_OFFLINE:
        raise PresetError(f"{where} is not in the Hugging Face cache and HF_HUB_OFFLINE "
                          f"is set. {_LOCAL_HINT}")
    if not reachable(constants.ENDPOINT):
        raise PresetError(f"{where} must be downloaded but {constants.ENDPOINT} is "
                          f"unreachable from here. {_LOCAL_HINT}")
    try:
        return pathlib.Path(huggingface_hub.snapshot_download(
            repo, revision=revision, allow_patterns=patterns))
    except Exception as error:  # Gated repos, 404s and network errors.
        raise PresetError(f"{where} could not be downloaded: {error}. Gated repos "
                          f"need HF_TOKEN set. {_LOCAL_HINT}") from error
