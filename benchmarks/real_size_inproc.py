"""One in-process case of real_size.py, in a process of its own.

`python benchmarks/real_size_inproc.py '<json spec>'` loads one checkpoint
with one library in one dtype, times its forward on one (batch, length)
shape and prints one line `RESULT <json>`: load seconds, the first call
(with JAX, the compilation too), each timed call after warm-up, and the
process's resident memory (/proc/self/status) once the library is
imported (`mem_base`, before the model), after loading, after the first call
and at the end. real_size.py starts one such process per case
and round, so that memory is per case and only one model is in memory.

- `gemma_core`: the model built as a worker builds it,
  `worker.sharded_backbone.ShardedBackbone(WorkerSpec(preset, mesh 1x1,
  dtype))`, in the environment a worker's actor gets (real_size.py passes
  `actor_options`' variables). `fn: worker` (the default) times
  `ShardedBackbone.run`, the jitted function a worker serves with (layers
  [-1] in every layer slot, no adapter, the result copied to the host);
  `fn: library` times `backbone.make_forward_fn(layers=[-1])`.
- `transformers`: `AutoModel.from_pretrained(dir, dtype=...)` (the base
  Gemma/Gemma2Model, no LM head), `eval()`, called under
  `torch.inference_mode()` with `use_cache=False`, the last hidden state
  copied to the host; `torch.set_num_threads(threads)`.

Every call runs `batch` rows of `length` random token ids, no padding.
With `parity` set, the process also writes the final hidden states of a
fixed 1 x 32 input to that .npy file (float32), for real_size.py to compare
across libraries.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from proc_memory import memory_status  # noqa: E402  (benchmarks/, beside this file)

PARITY_SHAPE = (1, 32)


def token_batch(vocabulary_size: int, batch: int, length: int, seed) -> tuple:
    ids = np.random.default_rng(seed).integers(0, vocabulary_size, (batch, length))
    return ids.astype("int32"), np.ones((batch, length), "int32")


class GemmaCase:
    def __init__(self, spec: dict):
        import jax

        from worker.sharded_backbone import ShardedBackbone
        from worker.worker_config import BatchingConfig, WorkerSpec

        self.model = ShardedBackbone(WorkerSpec(preset=spec["preset"], mesh_shape=(1, 1),
                                                dtype=spec["dtype"]))
        config = self.model.backbone.get_config()
        self.vocabulary_size = config["vocabulary_size"]
        self.layer_ids = np.full((BatchingConfig().layer_slots,), config["num_layers"], "int32")
        self.fn = spec.get("fn", "worker")
        if self.fn == "library":
            self._forward = self.model.backbone.make_forward_fn(layers=[-1])
        self.device = str(jax.devices()[0])
        self._jax = jax

    def __call__(self, token_ids, padding_mask) -> np.ndarray:
        if self.fn == "library":
            return np.asarray(self._forward(token_ids, padding_mask)[0])
        slots = np.zeros(len(token_ids), "int32")
        return self.model.run(token_ids, padding_mask, self.layer_ids, slots)[0]

    def describe(self) -> dict:
        return {"device": self.device, "fn": self.fn}

    def device_peak(self) -> int | None:
        stats = self._jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")


class TransformersCase:
    def __init__(self, spec: dict):
        import torch
        import transformers

        torch.set_num_threads(spec["threads"])
        self.device = "cuda" if spec["gpus"] and torch.cuda.is_available() else "cpu"
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[spec["dtype"]]
        self.model = transformers.AutoModel.from_pretrained(spec["preset"], dtype=dtype)
        self.model.eval()
        self.model.to(self.device)
        self.vocabulary_size = self.model.config.vocab_size
        self._torch = torch

    def __call__(self, token_ids, padding_mask) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(token_ids).long().to(self.device),
                             attention_mask=torch.from_numpy(padding_mask).long().to(self.device),
                             use_cache=False).last_hidden_state
            return out.cpu().float().numpy()

    def describe(self) -> dict:
        torch = self._torch
        return {"device": self.device, "class": type(self.model).__name__,
                "attention": getattr(self.model.config, "_attn_implementation", None),
                "threads": torch.get_num_threads()}

    def device_peak(self) -> int | None:
        torch = self._torch
        return torch.cuda.max_memory_allocated() if self.device == "cuda" else None


def import_library(library: str) -> None:
    """Imports what the case needs before the model loads, so that the
    memory measured then is the runtime's alone (`mem_base`)."""
    if library == "gemma_core":
        import jax  # noqa: F401
        import worker.sharded_backbone  # noqa: F401
    else:
        import torch  # noqa: F401
        from transformers import AutoModel  # noqa: F401


def run(spec: dict) -> dict:
    import_library(spec["library"])
    result = {"mem_base": memory_status()}
    start = time.perf_counter()
    case = (GemmaCase if spec["library"] == "gemma_core" else TransformersCase)(spec)
    result.update(load_s=time.perf_counter() - start, mem_loaded=memory_status())
    batch, length = spec["shape"]
    token_ids, padding_mask = token_batch(case.vocabulary_size, batch, length,
                                          [spec["seed"], batch, length])
    t0 = time.perf_counter()
    out = case(token_ids, padding_mask)
    result["first_s"] = time.perf_counter() - t0
    result["finite"] = bool(np.isfinite(np.asarray(out, "float32")).all())
    result["mem_first"] = memory_status()
    for _ in range(spec["warmup"]):
        case(token_ids, padding_mask)
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        case(token_ids, padding_mask)
        times.append(time.perf_counter() - t0)
    result.update(times=times, mem_end=memory_status(), device_peak=case.device_peak(),
                  describe=case.describe())
    if spec.get("parity"):
        ids, mask = token_batch(case.vocabulary_size, *PARITY_SHAPE, [spec["seed"], 7])
        np.save(spec["parity"], np.asarray(case(ids, mask), "float32"))
    return result


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec["library"] == "gemma_core":
        os.environ.setdefault("KERAS_BACKEND", "jax")
    result = run(spec)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
