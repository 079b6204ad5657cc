"""What Score costs beside Forward, at real size, in the worker's own code.

Loads a checkpoint as a worker does (`ShardedBackbone`, mesh 1x1, the
worker's jitted forward and score programs), compiles both for each
(rows, length) shape, and times, interleaved, per shape:

- forward: the batch's final hidden states to the host (what Forward runs);
- + candidates: the same batch, every row asking two candidates at its
  last position (a ShieldGemma verdict);
- + top-20: every row asking the 20 likeliest next tokens at its last
  position;
- + token logprobs: every row asking each token's log-probability (the
  head over every position: B x (T-1) picks of the whole vocabulary).

Prints one table: median seconds of each, and each as a ratio of the
forward alone; and each shape's compile seconds (forward, score program).

    python benchmarks/score_cost.py [--preset DIR] [--dtype bfloat16]
        [--shapes 1x128,8x128] [--repeats 5]

Default preset: the random gemma2_2b checkpoint real_size.py writes under
~/.cache/gemma-serve-bench (run `make bench-real` once first).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

DEFAULT_PRESET = pathlib.Path.home() / ".cache/gemma-serve-bench/gemma2_2b_en-random-bf16-seed0"


def batch_for(kind: str, rows: int, length: int, vocabulary_size: int, final: int):
    from worker.batch import Batch, BatchRow
    from worker.score_picks import ScoreSpec

    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocabulary_size, (rows, length)).astype("int32")
    spec = {"candidates": ScoreSpec(candidates=(1, 2)),
            "top-20": ScoreSpec(top_k=20, positions=(length - 1,)),
            "token logprobs": ScoreSpec(token_logprobs=True)}.get(kind)
    layer_ids = np.full((4,), final, "int32")
    batch_rows = tuple(BatchRow(length=length, layers=(0,), score=spec) for _ in range(rows))
    return Batch(ids, np.ones_like(ids), layer_ids, np.zeros(rows, "int32"), batch_rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default=str(DEFAULT_PRESET))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shapes", default="1x128,8x128")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]

    from worker.score_picks import ScorePicks
    from worker.sharded_backbone import ShardedBackbone
    from worker.worker_config import BatchingConfig, WorkerSpec

    started = time.perf_counter()
    model = ShardedBackbone(WorkerSpec(preset=args.preset, mesh_shape=(1, 1), dtype=args.dtype,
                                       batching=BatchingConfig(layer_slots=4)))
    config = model.backbone.config
    print(f"loaded {args.preset} ({args.dtype}) in {time.perf_counter() - started:.1f} s; "
          f"vocabulary {config.vocabulary_size}, width {config.hidden_dim}")
    compile_seconds = {}  # shape -> (forward, score program)
    for shape in shapes:
        before = time.perf_counter()
        score = model.compile_buckets([shape])
        compile_seconds[shape] = (time.perf_counter() - before - score, score)

    kinds = ["forward", "candidates", "top-20", "token logprobs"]
    times = {(shape, kind): [] for shape in shapes for kind in kinds}

    def run(batch):
        picks = ScorePicks.of(batch)
        if picks is None:
            model.run(batch.token_ids, batch.padding_mask, batch.layer_ids, batch.slot_ids)
        else:
            model.run_scored(batch.token_ids, batch.padding_mask, batch.layer_ids,
                             batch.slot_ids, picks, hidden_wanted=False)

    batches = {(shape, kind): batch_for(kind, *shape, config.vocabulary_size, config.num_layers)
               for shape in shapes for kind in kinds}
    compiled = model.compiled_functions()
    for key, batch in batches.items():  # warm-up: nothing should compile here
        run(batch)
    assert model.compiled_functions() == compiled, "a program compiled after compile_buckets"
    for _ in range(args.repeats):
        for key, batch in batches.items():  # interleaved
            before = time.perf_counter()
            run(batch)
            times[key].append(time.perf_counter() - before)

    print(f"\n| shape | compile s: forward, score | {' | '.join(kinds)} |")
    print("|---|---|" + "---|" * len(kinds))
    for shape in shapes:
        base = statistics.median(times[(shape, "forward")])
        cells = [f"{statistics.median(times[(shape, k)]):.3f} s "
                 f"({statistics.median(times[(shape, k)]) / base:.2f}x)" for k in kinds]
        forward_s, score_s = compile_seconds[shape]
        print(f"| {shape[0]}x{shape[1]} | {forward_s:.1f}, {score_s:.1f} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
