"""`gemma-client`: call a gemma-serve from the shell.

The API key comes from --api-key, else from $GEMMA_SERVE_API_KEY. Errors
print `gemma-client: <STATUS_CODE>: <details>` and exit non-zero.

Examples:
  gemma-client forward --text "Hello" --layers 0,-1 [--adapter support]
  gemma-client adapters upload support support.lora.h5
  gemma-client adapters upload support ./my-peft-adapter
  gemma-client adapters list
  gemma-client datasets upload faq faq.jsonl
  gemma-client datasets list
  gemma-client finetune start faq --dataset faq --steps 200 --watch
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc
import numpy as np

from coordinator.client import TERMINAL_STATES, GemmaClient, tls_credentials

API_KEY_ENV = "GEMMA_SERVE_API_KEY"


def _ids(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _table(rows: list[dict], columns: list[tuple[str, object]], empty: str) -> str:
    """A left-aligned text table; each column is (heading, key or function)."""
    if not rows:
        return empty
    cells = [[heading for heading, _ in columns]]
    for row in rows:
        cells.append([str(get(row) if callable(get) else row.get(get, ""))
                      for _, get in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
                     for line in cells)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def _layers(layers: list[int]) -> str:
    """[0, 1, 2, 3, 7] -> "0-3,7"."""
    spans, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            spans.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ",".join(spans) or "-"


def _seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return (f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600
            else f"{seconds // 60}:{seconds % 60:02d}")


ADAPTER_COLUMNS = [
    ("ADAPTER_ID", "adapter_id"), ("RANK", "rank"), ("ALPHA", lambda a: f"{a['alpha']:g}"),
    ("TARGETS", lambda a: ",".join(a["targets"])), ("LAYERS", lambda a: _layers(a["layers"])),
    ("PARAMS", "num_parameters"), ("SIZE", lambda a: _size(a["size_bytes"])),
    ("SOURCE", "source"), ("CREATED", "created"),
    ("RESIDENT_ON", lambda a: ",".join(a["resident_on"]) or "-")]

JOB_COLUMNS = [
    ("JOB_ID", "job_id"), ("STATE", "state"), ("ADAPTER", lambda j: j["adapter_id"] or
                                                f"{j['adapter_name']} (pending)"),
    ("STEP", lambda j: f"{j['step']}/{j['total_steps']}"),
    ("LOSS", lambda j: f"{j['first_loss']:.4f} -> {j['loss']:.4f}" if j["step"] else "-"),
    ("WORKER", lambda j: j["worker_id"] or "-"), ("CREATED", "created"),
    ("ERROR", lambda j: j["error"] or "")]


def _print_adapter(adapter: dict, verb: str) -> None:
    print(f"{verb} {adapter['adapter_id']}: rank {adapter['rank']}, alpha "
          f"{adapter['alpha']:g}, {','.join(adapter['targets'])} of layers "
          f"{_layers(adapter['layers'])}, {adapter['num_parameters']} parameters, "
          f"{_size(adapter['size_bytes'])}, sha256 {adapter['sha256'][:12]}")


class _Progress:
    """A progress bar on stderr for a fine-tune job's updates (tqdm when it
    is installed, else a line redrawn in place)."""

    def __init__(self, job_id: str):
        self._job_id = job_id
        self._bar = None
        self._last_line = 0
        try:
            from tqdm import tqdm
        except ImportError:
            self._tqdm = None
        else:
            self._tqdm = tqdm

    def _postfix(self, job: dict) -> str:
        parts = [job["state"]]
        if job["step"]:
            parts.append(f"loss {job['loss']:.4f}")
            parts.append(f"{job['tokens_per_second']:,.0f} tok/s")
        if job["state"] == "running" and job["eta_seconds"]:
            parts.append(f"ETA {_seconds(job['eta_seconds'])}")
        return ", ".join(parts)

    def update(self, job: dict) -> None:
        total = job["total_steps"] or None
        if self._tqdm is not None:
            if self._bar is None:
                self._bar = self._tqdm(total=total, desc=f"job {self._job_id}", unit="step",
                                       file=sys.stderr, dynamic_ncols=True,
                                       bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                                                  "{n_fmt}/{total_fmt} [{elapsed}{postfix}]")
            if total and self._bar.total != total:
                self._bar.total = total
            self._bar.n = job["step"]
            self._bar.set_postfix_str(self._postfix(job), refresh=False)
            self._bar.refresh()
            return
        width = 30
        done = int(width * job["step"] / total) if total else 0
        line = (f"job {self._job_id}: [{'#' * done}{'.' * (width - done)}] "
                f"{job['step']}/{job['total_steps']} {self._postfix(job)}")
        sys.stderr.write("\r" + line.ljust(self._last_line))
        sys.stderr.flush()
        self._last_line = len(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._last_line:
            sys.stderr.write("\n")


def _watch(client: GemmaClient, job_id: str, quiet: bool) -> int:
    """Follows a job to its end; prints its outcome; 0 if it succeeded."""
    progress = None if quiet else _Progress(job_id)
    last = None
    try:
        for job in client.watch_fine_tune(job_id):
            last = job
            if progress is not None:
                progress.update(job)
    finally:
        if progress is not None:
            progress.close()
    if last is None or last["state"] not in TERMINAL_STATES:
        state = last["state"] if last else "unknown"
        print(f"gemma-client: the watch on job {job_id} ended with the job {state}",
              file=sys.stderr)
        return 1
    print(f"job {job_id} {last['state']} after {last['step']}/{last['total_steps']} steps"
          + (f", loss {last['first_loss']:.4f} -> {last['loss']:.4f}" if last["step"] else ""))
    if last["state"] == "succeeded":
        print(f"adapter {last['adapter_id']}")
        return 0
    if last["error"]:
        print(f"error: {last['error']}")
    return 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gemma-client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--api-key", default=None, help=f"default: ${API_KEY_ENV}")
    p.add_argument("--tls-ca", default=None,
                   help="connect with TLS, trusting this CA (PEM); see --tls")
    p.add_argument("--tls", action="store_true",
                   help="connect with TLS, trusting the system's CAs")
    p.add_argument("--tls-cert", default=None, help="client certificate for mutual TLS")
    p.add_argument("--tls-key", default=None, help="client key for mutual TLS")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds per call (watching a job has no limit)")
    commands = p.add_subparsers(dest="command", required=True)

    forward = commands.add_parser("forward", help="hidden states for texts or token ids")
    forward.add_argument("--text", action="append", default=[], help="repeatable")
    forward.add_argument("--ids", action="append", type=_ids, default=[],
                         help="comma-separated token ids; repeatable")
    forward.add_argument("--layers", type=_ids, default=[], help="e.g. 0,-1 (default -1)")
    forward.add_argument("--pooling", choices=["none", "last_token", "mean"], default="none")
    forward.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                         default="float32")
    forward.add_argument("--adapter", default="", help="a LoRA adapter id (name or name@N)")
    forward.add_argument("--truncate", choices=["start", "end"], default=None,
                         help="a sequence over the server's limit keeps its start or its end "
                              "(default: refused)")
    forward.add_argument("--dimensions", type=int, default=0, metavar="N",
                         help="keep each vector's first N values (default: all)")
    forward.add_argument("--normalize", action="store_true",
                         help="L2-normalize each vector (after --dimensions)")
    forward.add_argument("--save", default=None, metavar="PATH",
                         help="FILE.npz: every array (keys seq{i}_layer{l}); FILE.npy: the "
                              "one array a single sequence and layer gives; a directory: "
                              "one seq{i}_layer{l}.npy per array (bfloat16 saved as float32)")
    score = commands.add_parser("score", help="log-probabilities from the language-model "
                                              "head, as JSON")
    score.add_argument("--text", action="append", default=[], help="repeatable")
    score.add_argument("--ids", action="append", type=_ids, default=[],
                       help="comma-separated token ids; repeatable")
    score.add_argument("--adapter", default="", help="a LoRA adapter id (name or name@N)")
    score.add_argument("--truncate", choices=["start", "end"], default=None)
    score.add_argument("--token-logprobs", action="store_true",
                       help="each token's log-probability given the ones before it")
    score.add_argument("--top-k", type=int, default=0, metavar="K",
                       help="the K likeliest next tokens at --positions")
    score.add_argument("--positions", type=_ids, default=[],
                       help="comma-separated positions for --top-k (default -1, the last); "
                            "negative ones after an =, as --positions=-2,-1")
    score.add_argument("--no-bos", action="store_true", help="texts without <bos>")
    candidates = score.add_mutually_exclusive_group()
    candidates.add_argument("--candidate", action="append", default=[], metavar="TEXT",
                            help="a one-token answer to weigh at the last position, e.g. "
                                 "--candidate Yes --candidate No; repeatable")
    candidates.add_argument("--candidate-ids", type=_ids, default=[],
                            help="comma-separated candidate token ids")
    tokens = commands.add_parser("tokenize", help="texts to token ids, or --ids back to text")
    tokens.add_argument("--text", action="append", default=[], help="repeatable")
    tokens.add_argument("--ids", action="append", type=_ids, default=[],
                        help="comma-separated ids to decode; repeatable")
    tokens.add_argument("--no-bos", action="store_true", help="texts without <bos>")
    commands.add_parser("info", help="the model, workers and limits")

    adapters = commands.add_parser("adapters", help="your LoRA adapters").add_subparsers(
        dest="action", required=True)
    upload = adapters.add_parser("upload", help="upload a PEFT adapter directory, or a "
                                                "`.lora.h5`, `.safetensors` or PEFT `.tar` file")
    upload.add_argument("name")
    upload.add_argument("file", metavar="PATH")
    upload.add_argument("--format", choices=["lora.h5", "safetensors", "peft"], default=None,
                        help="default: a directory is PEFT, a file's name says")
    register = adapters.add_parser(
        "register", help="copy an adapter into the registry from hf://org/repo[@rev][/sub], "
                         "kaggle://..., or a path under the server's --adapter-source-root")
    register.add_argument("name")
    register.add_argument("source")
    listing = adapters.add_parser("list", help="every version of your adapters")
    listing.add_argument("--json", action="store_true")
    for action, text in (("load", "make resident on the workers now"),
                         ("unload", "release the workers' slots"),
                         ("delete", "delete NAME (every version) or NAME@N")):
        adapters.add_parser(action, help=text).add_argument("adapter_id")
    export = adapters.add_parser("export", help="download as a keras_hub .lora.h5 (default), "
                                                "a PEFT archive or gemma-serve safetensors")
    export.add_argument("adapter_id")
    export.add_argument("out", help="file, or directory for the server's suggested name")
    export.add_argument("--format", choices=["lora.h5", "safetensors", "peft"],
                        default="lora.h5", help="peft: a .tar of the PEFT adapter directory")

    datasets = commands.add_parser("datasets", help="training data").add_subparsers(
        dest="action", required=True)
    upload = datasets.add_parser("upload", help='JSON Lines: {"text": ...} or {"ids": [...]}')
    upload.add_argument("name")
    upload.add_argument("file")
    datasets.add_parser("list", help="your datasets")
    datasets.add_parser("delete", help="delete dataset NAME").add_argument("name")

    finetune = commands.add_parser("finetune", help="LoRA fine-tuning jobs").add_subparsers(
        dest="action", required=True)
    start = finetune.add_parser("start", help="train a new version of adapter NAME")
    start.add_argument("name")
    data = start.add_mutually_exclusive_group(required=True)
    data.add_argument("--text", action="append", dest="texts", metavar="TEXT",
                      help="a training text; repeatable")
    data.add_argument("--texts-file", metavar="FILE", help="one training text per line")
    data.add_argument("--dataset", metavar="ID", help="an uploaded dataset's id")
    start.add_argument("--rank", type=int, help="default 8")
    start.add_argument("--alpha", type=float, help="default: the rank")
    start.add_argument("--lr", type=float, dest="learning_rate", metavar="LR",
                       help="default 1e-3")
    length = start.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int)
    length.add_argument("--epochs", type=int, help="default 1")
    start.add_argument("--batch-size", type=int, help="default 8")
    start.add_argument("--sequence-length", type=int, help="default 128")
    start.add_argument("--seed", type=int)
    start.add_argument("--targets", metavar="LIST",
                       help="comma-separated projections to adapt (query,value by default; "
                            "PEFT's q_proj,...,down_proj names work too), or all-linear")
    start.add_argument("--from", dest="initial_adapter_id", metavar="ADAPTER",
                       help="continue training this adapter")
    start.add_argument("--watch", action="store_true", help="follow the job to its end")
    start.add_argument("--quiet", action="store_true", help="no progress bar with --watch")
    watch = finetune.add_parser("watch", help="follow a job; exits 1 unless it succeeds")
    watch.add_argument("job_id")
    watch.add_argument("--quiet", action="store_true", help="no progress bar")
    finetune.add_parser("cancel", help="stop a queued or running job").add_argument("job_id")
    listing = finetune.add_parser("list", help="your jobs, newest first")
    listing.add_argument("--json", action="store_true")
    return p


def _tokenize(client: GemmaClient, args) -> int:
    if bool(args.text) == bool(args.ids):
        raise ValueError("tokenize takes --text or --ids, not both and not neither.")
    if args.text:
        for text, ids in zip(args.text, client.tokenize(
                args.text, add_bos=not args.no_bos, timeout=args.timeout)):
            print(f"{len(ids)} tokens: {','.join(map(str, ids))}")
    else:
        for text in client.detokenize(args.ids, timeout=args.timeout):
            print(json.dumps(text, ensure_ascii=False))
    return 0


def _score(client: GemmaClient, args) -> int:
    result = client.score(texts=args.text, token_ids=args.ids,
                          token_logprobs=args.token_logprobs, top_k=args.top_k,
                          top_k_positions=args.positions,
                          candidates=args.candidate or args.candidate_ids,
                          adapter_id=args.adapter, truncate=args.truncate,
                          add_bos=False if args.no_bos else None, timeout=args.timeout)

    def listed(array):
        return None if array is None else [round(float(x), 6) for x in array]
    print(json.dumps({
        "request_id": result.request_id, "worker_id": result.worker_id,
        "adapter_id": result.adapter_id, "candidate_ids": result.candidate_ids,
        "sequences": [{
            "token_ids": s.token_ids.tolist(), "truncated_tokens": s.truncated_tokens,
            "token_logprobs": listed(s.token_logprobs),
            "top_tokens": [{"position": position, "ids": ids.tolist(),
                            "logprobs": listed(logprobs)}
                           for position, ids, logprobs in s.top_tokens],
            "candidate_logprobs": listed(s.candidate_logprobs),
            "candidate_probs": listed(s.candidate_probs)} for s in result.sequences]},
        indent=1))
    return 0


def _forward(client: GemmaClient, args) -> int:
    save_as = _save_kind(args.save, args) if args.save else None  # before the call
    result = client.forward(texts=args.text, token_ids=args.ids, layers=args.layers,
                            pooling=args.pooling, dtype=args.dtype, adapter_id=args.adapter,
                            truncate=args.truncate, dimensions=args.dimensions,
                            normalize=args.normalize, timeout=args.timeout)
    print(f"request {result.request_id} on {result.worker_id} ({result.model}"
          + (f", adapter {result.adapter_id or args.adapter}" if args.adapter else "") + ")")
    arrays = {}
    for i, per_layer in enumerate(result.hidden_states):
        for layer, tensor in zip(result.layers, per_layer):
            values = tensor.astype(np.float32)
            dropped = result.truncated_tokens[i] if result.truncated_tokens else 0
            print(f"  seq {i} ({len(result.token_ids[i])} tokens"
                  + (f", {dropped} truncated" if dropped else "") + f") layer {layer}: "
                  f"shape {tensor.shape} {tensor.dtype} mean {values.mean():+.4f} "
                  f"std {values.std():.4f}")
            arrays[f"seq{i}_layer{layer}"] = tensor
    if save_as:
        print(_save_arrays(args.save, save_as, arrays))
    return 0


def _save_kind(path: str, args) -> str:
    """"npz", "npy" or "dir" for --save PATH, checked before the call so that
    a path that cannot take the answer does not throw the work away."""
    kind = {".npz": "npz", ".npy": "npy"}.get(os.path.splitext(path)[1].lower(), "dir")
    if kind == "dir":
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"--save {path}: exists and is not a directory; name a .npz or "
                             ".npy file, or a directory.")
        os.makedirs(path, exist_ok=True)
    elif not os.path.isdir(os.path.dirname(path) or "."):
        raise ValueError(f"--save {path}: no directory {os.path.dirname(path)!r} to write in.")
    # Only a request the server would accept (texts or ids, not both) has a
    # count to check; the server answers the others.
    sequences = len(args.text) if not args.ids else len(args.ids) if not args.text else 0
    arrays = sequences * max(1, len(set(args.layers)))
    if kind == "npy" and arrays > 1:
        raise ValueError(f"--save {path}: an .npy file holds one array and this request asks "
                         f"for {arrays} (sequences x layers); name a .npz file or a "
                         "directory instead.")
    return kind


def _save_arrays(path: str, kind: str, arrays: dict[str, np.ndarray]) -> str:
    """Writes `arrays` as `kind` says and says what it wrote. bfloat16
    becomes float32: numpy files cannot name it portably."""
    arrays = {name: a.astype(np.float32) if a.dtype.name == "bfloat16" else a
              for name, a in arrays.items()}
    if kind in ("npz", "npy"):
        with open(path, "wb") as file:  # numpy would add its own lower-case suffix to a name
            if kind == "npz":
                np.savez(file, **arrays)
            else:
                (array,) = arrays.values()
                np.save(file, array)
        return f"saved {len(arrays)} array{'s' * (len(arrays) != 1)} to {path}"
    os.makedirs(path, exist_ok=True)
    for name, array in arrays.items():
        np.save(os.path.join(path, f"{name}.npy"), array)
    return f"saved {len(arrays)} arrays to {os.path.join(path, 'seq*_layer*.npy')}"


def _adapters(client: GemmaClient, args) -> int:
    timeout = args.timeout
    if args.action == "upload":
        _print_adapter(client.upload_adapter(args.name, args.file, args.format,
                                             timeout=timeout), "uploaded")
    elif args.action == "register":
        _print_adapter(client.register_adapter(args.name, args.source, timeout=timeout),
                       "registered")
    elif args.action == "list":
        adapters = client.list_adapters(timeout=timeout)
        print(json.dumps(adapters, indent=2) if args.json
              else _table(adapters, ADAPTER_COLUMNS, "no adapters"))
    elif args.action == "load":
        loaded = client.load_adapter(args.adapter_id, timeout=timeout)
        print(f"loaded {loaded['adapter']['adapter_id']} on {', '.join(loaded['workers'])} "
              f"in {loaded['load_ms']:.1f} ms")
    elif args.action == "unload":
        workers = client.unload_adapter(args.adapter_id, timeout=timeout)
        print(f"unloaded {args.adapter_id} from {', '.join(workers)}" if workers
              else f"{args.adapter_id} was not resident on any worker")
    elif args.action == "delete":
        for adapter in client.delete_adapter(args.adapter_id, timeout=timeout):
            print(f"deleted {adapter['adapter_id']}")
    elif args.action == "export":
        path = client.export_adapter(args.adapter_id, args.out, args.format, timeout=timeout)
        print(f"exported {args.adapter_id} to {path} ({_size(path.stat().st_size)})")
    return 0


def _texts_file(path: str) -> list[str]:
    with open(path, encoding="utf-8") as file:
        return [line.rstrip("\r\n") for line in file if line.strip()]


def _finetune(client: GemmaClient, args) -> int:
    timeout = args.timeout
    if args.action == "start":
        texts = _texts_file(args.texts_file) if args.texts_file else args.texts
        job = client.start_fine_tune(
            args.name, texts=texts, dataset_id=args.dataset, rank=args.rank,
            alpha=args.alpha, learning_rate=args.learning_rate, steps=args.steps,
            epochs=args.epochs, batch_size=args.batch_size,
            sequence_length=args.sequence_length, seed=args.seed,
            initial_adapter_id=args.initial_adapter_id,
            targets=args.targets.split(",") if args.targets else None, timeout=timeout)
        print(f"job {job['job_id']} {job['state']}: training {job['adapter_name']}", flush=True)
        return _watch(client, job["job_id"], args.quiet) if args.watch else 0
    if args.action == "watch":
        return _watch(client, args.job_id, args.quiet)
    if args.action == "cancel":
        job = client.cancel_fine_tune(args.job_id, timeout=timeout)
        print(f"job {job['job_id']} {job['state']} at step {job['step']}/{job['total_steps']}")
        return 0
    jobs = client.list_fine_tunes(timeout=timeout)
    print(json.dumps(jobs, indent=2) if args.json
          else _table(jobs, JOB_COLUMNS, "no fine-tune jobs"))
    return 0


def _datasets(client: GemmaClient, args) -> int:
    if args.action == "list":
        for dataset in client.list_datasets(timeout=args.timeout):
            print(f"{dataset['dataset_id']}: {dataset['num_examples']} examples, "
                  f"{dataset['num_tokens']} tokens")
        return 0
    if args.action == "delete":
        dataset = client.delete_dataset(args.name, timeout=args.timeout)
        verb = "deleted"
    else:
        dataset = client.upload_dataset(args.name, args.file, timeout=args.timeout)
        verb = "uploaded"
    print(f"{verb} dataset {dataset['dataset_id']}: {dataset['num_examples']} examples, "
          f"{dataset['num_tokens']} tokens")
    return 0


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    credentials = (tls_credentials(args.tls_ca, args.tls_cert, args.tls_key)
                   if args.tls or args.tls_ca or args.tls_cert else None)
    with GemmaClient(args.target, api_key=api_key, credentials=credentials) as client:
        try:
            if args.command == "info":
                print(json.dumps(client.model_info(timeout=args.timeout), indent=2))
                code = 0
            elif args.command == "forward":
                code = _forward(client, args)
            elif args.command == "tokenize":
                code = _tokenize(client, args)
            elif args.command == "score":
                code = _score(client, args)
            elif args.command == "adapters":
                code = _adapters(client, args)
            elif args.command == "datasets":
                code = _datasets(client, args)
            else:
                code = _finetune(client, args)
        except grpc.RpcError as error:
            sys.exit(f"gemma-client: {error.code().name}: {error.details()}")
        except (OSError, ValueError) as error:
            sys.exit(f"gemma-client: {error}")
        except KeyboardInterrupt:
            sys.exit("gemma-client: interrupted")
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
