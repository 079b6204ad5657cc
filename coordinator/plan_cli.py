"""`gemma-serve plan`: will a preset fit on a mesh? Bytes per device, no weights.

Prints weights (exact, from the layout map), adapter slots and an activation
estimate per device against a per-device budget, and exits non-zero with a
REFUSED line when it does not fit, or when the mesh cannot be placed on the
nodes described by --devices-per-node and --nodes. Nothing is downloaded and
no device is touched: built-in names use their architecture from
GEMMA_PRESETS, directories their config.json.

Example:
    gemma-serve plan --preset gemma2_9b_en --mesh 1x2 --dtype bfloat16 --workers 4 \\
        --devices-per-node 8 --device-memory-gib 80
"""

from __future__ import annotations

import argparse
import math
import sys

from gemma_core import DEFAULT_PRESET, GEMMA_PRESETS, PresetError, read_preset_config
from gemma_core.default_preset import DEFAULT_CONFIG
from gemma_core.gemma_config import GemmaConfig
from gemma_core.memory_plan import GIB, MemoryPlan, plan_memory
from worker.worker_config import BatchingConfig, WorkerSpec

DTYPES = ("float32", "bfloat16", "mixed_bfloat16")
# JAX preallocates this fraction of each GPU and allocates only inside it
# (XLA_PYTHON_CLIENT_MEM_FRACTION); pass what you set there.
JAX_DEFAULT_MEMORY_FRACTION = 0.75
_BATCHING = BatchingConfig()


def _mesh(text: str) -> tuple[int, int]:
    try:
        shape = tuple(int(part) for part in text.lower().replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected DATAxMODEL such as 1x4, got {text!r}")
    return shape


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gemma-serve plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=DEFAULT_PRESET,
                   help="a built-in preset name or a local preset directory (keras_hub or "
                        "Hugging Face); kaggle:// and hf:// are not fetched (default: "
                        "%(default)s)")
    p.add_argument("--workers", type=_positive(int), default=1,
                   help="worker actors (default %(default)s)")
    p.add_argument("--mesh", type=_mesh, default=(1, 1),
                   help="per-worker mesh DATAxMODEL, as for gemma-serve (default 1x1)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="the dtype policy you serve with; default: a directory's own, float32 "
                        "for a built-in name (its Kaggle dtype is unknown until downloaded)")
    p.add_argument("--batch", type=_positive(int),
                   default=_BATCHING.max_batch_tokens // _BATCHING.max_sequence_length,
                   help="rows of the largest padded batch (default %(default)s: what "
                        "gemma-serve's default --max-batch-tokens allows at the longest "
                        "length bucket)")
    p.add_argument("--length", type=_positive(int), default=_BATCHING.max_sequence_length,
                   help="tokens per row: gemma-serve's longest --length-buckets entry "
                        "(default %(default)s)")
    p.add_argument("--max-layers-per-request", type=_positive(int),
                   default=_BATCHING.layer_slots, help="as for gemma-serve (default %(default)s)")
    p.add_argument("--max-adapters", type=_positive(int), default=WorkerSpec.max_adapters,
                   help="as for gemma-serve (default %(default)s)")
    p.add_argument("--max-adapter-rank", type=_positive(int),
                   default=WorkerSpec.max_adapter_rank,
                   help="as for gemma-serve (default %(default)s)")
    p.add_argument("--device-memory-gib", type=_positive(float), default=80.0,
                   help="memory of one device (default %(default)s: an A100/H100 80GB)")
    p.add_argument("--memory-fraction", type=_positive(float),
                   default=JAX_DEFAULT_MEMORY_FRACTION,
                   help="the part of it JAX may use: XLA_PYTHON_CLIENT_MEM_FRACTION "
                        "(default %(default)s, JAX's own default on GPUs)")
    p.add_argument("--devices-per-node", type=_positive(int), default=None,
                   help="GPUs per node: check that workers' meshes tile the nodes")
    p.add_argument("--nodes", type=_positive(int), default=1,
                   help="nodes with --devices-per-node devices each (default %(default)s)")
    p.add_argument("--table", nargs="+", type=_mesh, metavar="DATAxMODEL", default=None,
                   help="instead of one plan, a sizing table: one line per preset (--preset "
                        "may list several, comma-separated) and per mesh given here")
    args = p.parse_args(argv)
    if args.memory_fraction > 1:
        p.error(f"--memory-fraction is a part of the device, at most 1, got "
                f"{args.memory_fraction}")
    return args


def resolve(preset: str, dtype: str | None) -> tuple[GemmaConfig, str, str]:
    """(architecture, dtype policy, where the dtype came from) of `preset`,
    reading only its config. Raises PresetError for what cannot be planned."""
    if preset == DEFAULT_PRESET:
        return DEFAULT_CONFIG, dtype or "float32", "--dtype" if dtype else "the default model's"
    if preset in GEMMA_PRESETS:
        return (GEMMA_PRESETS[preset]["config"], dtype or "float32",
                "--dtype" if dtype else "assumed: pass the --dtype you serve with")
    if preset.startswith(("kaggle://", "hf://")):
        raise PresetError(f"plan does not download {preset}: pass a built-in name or the "
                          "preset's local directory.")
    class_name, kwargs = read_preset_config(preset)
    if class_name != "GemmaBackbone":
        raise PresetError(f"{preset} holds a {class_name}; plan knows GemmaBackbone only.")
    own = kwargs.get("dtype") or "float32"
    if own not in DTYPES:
        own = "float32"
    return GemmaConfig.from_kwargs(kwargs), dtype or own, "--dtype" if dtype else "the preset's"


def placement_problem(args) -> str | None:
    """Why the workers' meshes cannot be placed on the nodes, or None."""
    if args.devices_per_node is None:
        return None
    per_worker, per_node = math.prod(args.mesh), args.devices_per_node
    mesh = "x".join(map(str, args.mesh))
    if per_worker > per_node:
        return (f"mesh {mesh} needs {per_worker} devices in one worker, but a node has "
                f"{per_node}: a worker's devices must be on one node (Ray num_gpus).")
    if per_node % per_worker:
        return (f"mesh {mesh} ({per_worker} devices) does not divide the {per_node} devices "
                f"of a node: {per_node % per_worker} per node would sit idle. Use a mesh "
                f"whose size divides {per_node}.")
    capacity = args.nodes * (per_node // per_worker)
    if args.workers > capacity:
        return (f"{args.workers} workers of {per_worker} devices need "
                f"{args.workers * per_worker} devices; {args.nodes} node(s) of {per_node} "
                f"hold {capacity} such workers.")
    return None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _row(label: str, nbytes: int) -> str:
    return f"  {label:<30}{nbytes / GIB:10.3f}"


def report(plan: MemoryPlan, args, dtype_source: str, budget: int) -> list[str]:
    """The table, one line per string."""
    mesh = "x".join(map(str, plan.mesh_shape))
    terms = ", ".join(f"{name.replace('_', ' ')} {value / GIB:.3f}"
                      for name, value in plan.activations.items() if name != "total")
    return [
        f"gemma-serve plan: {args.preset}, {plan.config.num_parameters():,} parameters, "
        f"dtype {plan.dtype} ({dtype_source})",
        f"worker: mesh {mesh} (data x model) = {_count(plan.num_devices, 'device')}; "
        f"{_count(args.workers, 'worker')} = "
        f"{_count(args.workers * plan.num_devices, 'device')}",
        f"batch: {plan.rows} rows x {plan.length} tokens, {args.max_layers_per_request} "
        f"layer slots; adapters: {args.max_adapters} slots of rank <= "
        f"{args.max_adapter_rank}",
        "",
        f"  {'per device':<30}{'GiB':>10}",
        _row("weights (layout map, exact)", plan.weight_bytes),
        _row("adapter slots (2 copies)", plan.adapter_bytes),
        _row("activations (estimate)", plan.activation_bytes),
        f"    ({terms})",
        _row("total", plan.total_bytes),
        _row(f"budget ({args.device_memory_gib:g} GiB x {args.memory_fraction:g})", budget),
    ]


def suggest(plan: MemoryPlan, args, budget: int) -> str:
    """A larger model axis that fits, if one up to 16 devices per worker does."""
    data = plan.mesh_shape[0]
    for model in (2, 4, 8, 16):
        devices = data * model
        if model <= plan.mesh_shape[1] or devices > 16:
            continue
        if args.devices_per_node and args.devices_per_node % devices:
            continue
        bigger = _plan(args, plan.config, (data, model), plan.dtype)
        if bigger.fits(budget):
            return (f"try --mesh {data}x{model} ({bigger.total_bytes / GIB:.2f} GiB per "
                    "device)")
    return ("no mesh up to 16 devices fits: lower --batch or --length, fewer or smaller "
            "adapter slots, or a smaller --dtype")


def _plan(args, config: GemmaConfig, mesh: tuple[int, int], dtype: str) -> MemoryPlan:
    return plan_memory(config, mesh, dtype, rows=args.batch, length=args.length,
                       layer_slots=args.max_layers_per_request,
                       max_adapters=args.max_adapters, max_adapter_rank=args.max_adapter_rank)


def table(args, budget: int) -> int:
    """`--table`: one line per preset and mesh; exits 0 (it only informs),
    2 if a preset cannot be read."""
    header = (f"{'preset':<24}{'mesh':>6}{'weights':>9}{'adapters':>9}{'activ.':>8}"
              f"{'total':>8}  fits {budget / GIB:.0f} GiB")
    lines = [f"GiB per device; {args.batch} rows x {args.length} tokens, "
             f"{args.max_adapters} adapters of rank <= {args.max_adapter_rank}", header]
    for preset in args.preset.split(","):
        try:
            config, dtype, _ = resolve(preset, args.dtype)
        except (PresetError, ValueError) as error:
            print(f"gemma-serve plan: {error}", file=sys.stderr)
            return 2
        for mesh in args.table:
            plan = _plan(args, config, mesh, dtype)
            lines.append(
                f"{preset + ' ' + dtype:<24.24}{'x'.join(map(str, mesh)):>6}"
                f"{plan.weight_bytes / GIB:9.2f}{plan.adapter_bytes / GIB:9.2f}"
                f"{plan.activation_bytes / GIB:8.2f}{plan.total_bytes / GIB:8.2f}  "
                f"{'yes' if plan.fits(budget) else 'NO'}")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    """Runs `gemma-serve plan`; returns the exit status (0 fits, 1 refused,
    2 a preset that cannot be read). Argument errors exit 2 via argparse."""
    args = parse_args(argv)
    budget = int(args.device_memory_gib * args.memory_fraction * GIB)
    if args.table:
        return table(args, budget)
    try:
        config, dtype, dtype_source = resolve(args.preset, args.dtype)
    except (PresetError, ValueError) as error:
        print(f"gemma-serve plan: {error}", file=sys.stderr)
        return 2
    plan = _plan(args, config, args.mesh, dtype)
    print("\n".join(report(plan, args, dtype_source, budget)))
    problem = placement_problem(args)
    if problem:
        print(f"REFUSED: {problem}")
        return 1
    if not plan.fits(budget):
        print(f"REFUSED: needs {plan.total_bytes / GIB:.2f} GiB per device, over the "
              f"{budget / GIB:.2f} GiB budget; {suggest(plan, args, budget)}.")
        return 1
    per_worker = plan.total_bytes * plan.num_devices
    print(f"OK: {plan.total_bytes / GIB:.2f} of {budget / GIB:.2f} GiB per device "
          f"({100 * plan.total_bytes / budget:.0f}%); {per_worker / GIB:.2f} GiB per worker, "
          f"{args.workers * per_worker / GIB:.2f} GiB for {_count(args.workers, 'worker')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
