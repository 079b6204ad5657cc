"""`gemma-client`: call a gemma-serve from the shell."""

from __future__ import annotations

import argparse
import json
import sys

import grpc
import numpy as np

from coordinator.client import GemmaClient


def _ids(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="gemma-client", description=__doc__)
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=60.0)
    commands = p.add_subparsers(dest="command", required=True)
    forward = commands.add_parser("forward", help="hidden states for texts or token ids")
    forward.add_argument("--text", action="append", default=[], help="repeatable")
    forward.add_argument("--ids", action="append", type=_ids, default=[],
                         help="comma-separated token ids; repeatable")
    forward.add_argument("--layers", type=_ids, default=[], help="e.g. 0,-1 (default -1)")
    forward.add_argument("--pooling", choices=["none", "last_token", "mean"], default="none")
    forward.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                         default="float32")
    forward.add_argument("--save", default=None,
                         help="write the arrays to this .npz (key seq{i}_layer{l})")
    commands.add_parser("info", help="the model, workers and limits")
    args = p.parse_args(argv)

    with GemmaClient(args.target, api_key=args.api_key) as client:
        try:
            if args.command == "info":
                print(json.dumps(client.model_info(timeout=args.timeout), indent=2))
                return
            result = client.forward(texts=args.text, token_ids=args.ids, layers=args.layers,
                                    pooling=args.pooling, dtype=args.dtype,
                                    timeout=args.timeout)
        except grpc.RpcError as error:
            sys.exit(f"gemma-client: {error.code().name}: {error.details()}")
    print(f"request {result.request_id} on {result.worker_id} ({result.model})")
    arrays = {}
    for i, per_layer in enumerate(result.hidden_states):
        for layer, tensor in zip(result.layers, per_layer):
            values = tensor.astype(np.float32)
            print(f"  seq {i} ({len(result.token_ids[i])} tokens) layer {layer}: "
                  f"shape {tensor.shape} {tensor.dtype} mean {values.mean():+.4f} "
                  f"std {values.std():.4f}")
            arrays[f"seq{i}_layer{layer}"] = tensor
    if args.save:
        np.savez(args.save, **{k: v.astype(np.float32) for k, v in arrays.items()})
        print(f"saved {len(arrays)} arrays to {args.save}")


if __name__ == "__main__":
    main()
