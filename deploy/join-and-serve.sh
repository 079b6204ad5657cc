#!/usr/bin/env bash
# gemma-serve-join: run the coordinator on a machine that is not yet a Ray node.
#
#   gemma-serve-join --ray-address HEAD:6379 [any other gemma-serve flags]
#
# A Ray driver needs a raylet on its own machine: `ray.init(address=...)` from
# a host with none fails ("cannot find a local Raylet"). So this joins the
# cluster as a node with no CPUs and no GPUs (no worker actor is ever placed
# here) and then becomes gemma-serve, with the same arguments. `exec` makes
# gemma-serve PID 1 of the container, so SIGTERM reaches it and it drains.
set -euo pipefail

address=""
previous=""
for arg in "$@"; do
  if [[ "$previous" == "--ray-address" ]]; then address="$arg"; fi
  if [[ "$arg" == --ray-address=* ]]; then address="${arg#--ray-address=}"; fi
  previous="$arg"
done
if [[ -z "$address" ]]; then
  echo "gemma-serve-join: pass --ray-address HOST:PORT (the Ray head's GCS address)" >&2
  exit 2
fi

# The object store holds adapter and dataset uploads on their way to workers;
# a small one is plenty on a node that runs no actors.
ray start --address="$address" --num-cpus=0 --num-gpus=0 \
  --object-store-memory="${GEMMA_SERVE_OBJECT_STORE_BYTES:-1000000000}" \
  --disable-usage-stats
exec gemma-serve "$@"
