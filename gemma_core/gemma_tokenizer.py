"""GemmaTokenizer: SentencePiece with Gemma's special tokens."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Sequence

import numpy as np
import sentencepiece

from gemma_core import hf_format, keras_hub_format
from gemma_core.errors import PresetError
from gemma_core.preset_source import resolve_preset


class GemmaTokenizer:
    """Text <-> token ids with a SentencePiece model (`<pad>` 0, `<eos>` 1,
    `<bos>` 2 in Gemma's vocabulary; read from the model, not assumed).

    Args:
        proto: path to a `.spm` / `tokenizer.model` file, or its bytes.

    Example:
    >>> tokenizer = GemmaTokenizer.from_preset("path/to/preset")
    >>> ids = tokenizer.tokenize("The quick brown fox", add_bos=True)
    >>> tokenizer.detokenize(ids)
    'The quick brown fox'
    """

    def __init__(self, proto: str | os.PathLike | bytes):
        self._proto = proto if isinstance(proto, bytes) else pathlib.Path(proto).read_bytes()
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self._proto)
        except Exception as error:  # sentencepiece raises RuntimeError/OSError.
            raise PresetError(f"Not a SentencePiece model: {error}") from error
        self.pad_token_id = self._special("<pad>", self._sp.pad_id())
        self.bos_token_id = self._special("<bos>", self._sp.bos_id())
        self.eos_token_id = self._special("<eos>", self._sp.eos_id())

    def _special(self, piece: str, fallback: int) -> int:
        token_id = self._sp.PieceToId(piece)
        # PieceToId answers unk_id for a piece it lacks.
        if token_id != self._sp.unk_id() or piece == self._sp.IdToPiece(token_id):
            return token_id
        if fallback < 0:
            raise PresetError(f"The SentencePiece model has no {piece} token.")
        return fallback

    @property
    def proto(self) -> bytes:
        return self._proto

    def vocabulary_size(self) -> int:
        return self._sp.GetPieceSize()

    def id_to_token(self, token_id: int) -> str:
        return self._sp.IdToPiece(token_id)

    def token_to_id(self, token: str) -> int:
        return self._sp.PieceToId(token)

    def tokenize(self, text: str | Sequence[str], add_bos: bool = False,
                 add_eos: bool = False):
        """One text -> list of ids; a list of texts -> list of lists."""
        if isinstance(text, str):
            return self._encode(text, add_bos, add_eos)
        return [self._encode(t, add_bos, add_eos) for t in text]

    def _encode(self, text: str, add_bos: bool, add_eos: bool) -> list[int]:
        ids = self._sp.EncodeAsIds(text)
        return [self.bos_token_id] * add_bos + ids + [self.eos_token_id] * add_eos

    def detokenize(self, ids) -> str:
        """One sequence of ids -> text, dropping pad/bos/eos."""
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"detokenize takes one sequence of ids, got shape {ids.shape}; "
                             "use detokenize_batch for several.")
        special = {self.pad_token_id, self.bos_token_id, self.eos_token_id}
        return self._sp.DecodeIds([int(i) for i in ids if int(i) not in special])

    def detokenize_batch(self, batch) -> list[str]:
        return [self.detokenize(ids) for ids in batch]

    @classmethod
    def from_preset(cls, preset: str | os.PathLike) -> "GemmaTokenizer":
        """Loads from a keras_hub preset (`assets/tokenizer/vocabulary.spm`) or
        a Hugging Face checkpoint (`tokenizer.model`)."""
        directory = resolve_preset(preset)
        for candidate in (directory / keras_hub_format.TOKENIZER_ASSET,
                          directory / hf_format.TOKENIZER_FILE):
            if candidate.is_file():
                return cls(candidate)
        raise PresetError(
            f"No tokenizer in {directory}: expected {keras_hub_format.TOKENIZER_ASSET} "
            f"(keras_hub) or {hf_format.TOKENIZER_FILE} (Hugging Face).")

    def save_to_preset(self, preset_dir: str | os.PathLike) -> None:
        """Writes `tokenizer.json` and the vocabulary as keras_hub does."""
        directory = pathlib.Path(preset_dir)
        asset = directory / keras_hub_format.TOKENIZER_ASSET
        asset.parent.mkdir(parents=True, exist_ok=True)
        asset.write_bytes(self._proto)
        config = {
            "module": "keras_hub.src.models.gemma.gemma_tokenizer",
            "class_name": "GemmaTokenizer",
            "config": {"name": "gemma_tokenizer", "trainable": True,
                       "dtype": {"module": "keras", "class_name": "DTypePolicy",
                                 "config": {"name": "int32"}, "registered_name": None},
                       "config_file": keras_hub_format.TOKENIZER_CONFIG_FILE,
                       "proto": None, "sequence_length": None,
                       "add_bos": False, "add_eos": False},
            "registered_name": "keras_hub>GemmaTokenizer",
        }
        (directory / keras_hub_format.TOKENIZER_CONFIG_FILE).write_text(
            json.dumps(config, indent=4))

