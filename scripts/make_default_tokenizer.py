"""Trains the small SentencePiece model bundled as the default tokenizer.

Run once; its output, gemma_core/assets/default_tokenizer.spm, is committed.
The corpus is the docstrings of CPython 3.11's standard library modules, so
the vocabulary is plain technical English. Byte fallback makes every UTF-8
text tokenizable (no <unk>). Gemma's special ids: <pad> 0, <eos> 1, <bos> 2.

    .venv/bin/python scripts/make_default_tokenizer.py
"""

import importlib
import io
import pathlib
import sys

import sentencepiece

# Modules with side effects on import (a browser, printed text, GUIs) are out.
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}
MODULES = sorted(m for m in sys.stdlib_module_names
                 if not m.startswith("_") and m not in SKIP)
OUT = pathlib.Path(__file__).resolve().parents[1] / "gemma_core/assets/default_tokenizer.spm"


def corpus():
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:  # Platform-specific modules; skipping is fine.
            continue
        for line in (module.__doc__ or "").splitlines():
            if line.strip():
                yield line.strip()


def main():
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=corpus(), model_writer=model, vocab_size=1024,
        model_type="bpe", byte_fallback=True, character_coverage=1.0,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", minloglevel=2)
    OUT.write_bytes(model.getvalue())
    print(f"wrote {OUT} ({len(model.getvalue())} bytes)")


if __name__ == "__main__":
    main()
