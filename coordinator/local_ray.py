"""The coordinator's private Ray: loopback only, token-authenticated.

Without `--ray-address` the coordinator starts a Ray instance of its own.
Whoever reaches an unauthenticated Ray can run code on it, so this one
listens on 127.0.0.1 only and requires a token known only to its process
tree: a fresh random one per start, in a 0600 file inside a private 0700
directory, handed to Ray's processes by path (RAY_AUTH_TOKEN_PATH), so the
token itself is in no environment, command line or log.

A joined cluster (`--ray-address`) keeps its own settings; deploy/README.md
says how to secure one.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import tempfile

LOOPBACK = "127.0.0.1"
# Ray's own switches, read from the environment by every Ray process.
AUTH_MODE_ENV = "RAY_AUTH_MODE"
AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"
AUTH_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
# Off, Ray keeps a loopback node address instead of replacing it with the
# host's outward one (its single-node mode for Windows and macOS).
CLUSTER_SWITCH_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def write_token_file() -> str:
    """A new random token in a file only this user can read; returns its
    path. The directory goes away when the process exits."""
    folder = tempfile.mkdtemp(prefix="gemma-serve-ray-")  # mode 0700
    path = os.path.join(folder, "auth_token")
    handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(handle, "w") as token_file:
        token_file.write(secrets.token_hex(32))
    atexit.register(_shut_down_then_remove, folder)
    return path


def _shut_down_then_remove(folder: str) -> None:
    # Ray's worker processes read the token file when they start, so it
    # must outlive them; this runs before Ray's own exit hook.
    import ray

    ray.shutdown()
    shutil.rmtree(folder, ignore_errors=True)


def start_local_ray(num_cpus: int | None) -> None:
    """Starts a private Ray on loopback with token authentication.

    Raises:
        RuntimeError: Ray came up on another address (a Ray version that
            ignores these settings): it is shut down rather than exposed.
    """
    import ray
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    os.environ.pop(AUTH_TOKEN_ENV, None)  # it would win over our file
    os.environ[AUTH_TOKEN_PATH_ENV] = write_token_file()
    os.environ[AUTH_MODE_ENV] = "token"
    os.environ[CLUSTER_SWITCH_ENV] = "0"  # for Ray's processes
    # This process read its Ray settings when it imported Ray: reread them
    # (as Ray does when it turns token auth on itself), and the token.
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    # The same for the cluster switch, which ray.init consults once, to
    # resolve the node address.
    cluster_switch = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        # "local" never joins another instance running on the host.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 _node_ip_address=LOOPBACK, logging_level=logging.WARNING)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_switch
    node_address = ray.util.get_node_ip_address()
    if node_address != LOOPBACK:
        ray.shutdown()
        raise RuntimeError(f"the local Ray started on {node_address}, not {LOOPBACK}; "
                           "refusing to run it reachable from other hosts.")
