"""JAX's persistent compilation cache for a worker, and what it saved."""

from __future__ import annotations

import dataclasses
import os

import jax

from gemma_core.default_preset import cache_root

# The cache evicts its least recently used programs beyond this: fine-tune
# steps compile per (batch size, sequence length, rank), which tenants choose,
# so it must not grow with their requests. A real-size model's bucket
# programs take a few hundred MiB in all.
MAX_CACHE_BYTES = 4 << 30

# JAX times every program it builds with the first event, whether compiled
# or loaded from the cache; a load also records the second.
_BUILT_EVENT = "/jax/core/compile/backend_compile_duration"
_HIT_EVENT = "/jax/compilation_cache/cache_hits"


@dataclasses.dataclass
class CompileCounts:
    """Programs this process compiled, and those it loaded from the cache."""

    compiled: int = 0
    loaded: int = 0


def node_cache_dir() -> str:
    """This node's own cache directory, for workers not told one (on a
    cluster the coordinator's paths mean nothing on the worker's node)."""
    return str(cache_root() / "compilation-cache")


def use_compilation_cache(directory: str | None) -> CompileCounts:
    """Keeps compiled programs in `directory` (None: `node_cache_dir()`), up
    to MAX_CACHE_BYTES, and counts compiles and cache hits from now on.

    Every program is kept, however fast it compiled: a restart should
    compile nothing, and the bucket programs of a real-size model take
    seconds to minutes each.
    """
    counts = CompileCounts()
    directory = directory or node_cache_dir()
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.config.update("jax_compilation_cache_max_size", MAX_CACHE_BYTES)

    def on_duration(event: str, _seconds: float, **_kwargs) -> None:
        if event == _BUILT_EVENT:
            counts.compiled += 1

    def on_event(event: str, **_kwargs) -> None:
        if event == _HIT_EVENT:  # counted as built first: a load, not a compile
            counts.loaded += 1
            counts.compiled -= 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    return counts
