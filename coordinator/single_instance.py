"""One server per data directory and per port.

Two coordinators on one data directory would disagree about adapters and
jobs, and the second one's start-up would clear the first one's uploads in
progress; two on one port would split the connections between them. So a
server holds an exclusive lock on its data directory for its whole life,
taken before anything there is touched, and listens without port reuse
(gRPC's default SO_REUSEPORT would let a second server bind the same port).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket

import grpc

LOCK_FILE = ".gemma-serve.lock"
# A server option: a second bind of the port fails instead of sharing it.
NO_PORT_REUSE = ("grpc.so_reuseport", 0)


class AlreadyInUse(RuntimeError):
    """Another server holds the data directory or the port."""


class DataDirLock:
    """An exclusive lock on a data directory, held until `release()` or
    the process ends (the kernel drops it then, so a crash leaves no stale
    lock). The lock file holds the owner's pid, for the message a second
    server gets.

    Example:
    >>> lock = DataDirLock("/var/lib/gemma-serve")
    >>> lock.release()

    Raises:
        AlreadyInUse: another process (or another server in this one) holds it.
    """

    def __init__(self, data_dir: str):
        self.path = os.path.join(data_dir, LOCK_FILE)
        try:
            os.makedirs(data_dir, exist_ok=True)
            # Not truncated at open: until the lock is ours, the pid in it
            # is the owner's.
            self._file = open(self.path, "a+")
        except OSError as error:
            raise RuntimeError(f"cannot lock the data directory {data_dir}: "
                               f"{error.strerror}") from None
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            owner = self._file.read().strip()
            self._file.close()
            raise AlreadyInUse(
                f"the data directory {data_dir} is in use by another gemma-serve"
                + (f" (pid {owner})" if owner.isdigit() else "")
                + "; stop it first, or give this one its own --data-dir.") from None
        try:  # unbuffered: nothing left to fail again at close
            os.ftruncate(self._file.fileno(), 0)
            os.write(self._file.fileno(), f"{os.getpid()}\n".encode())
        except OSError:
            pass  # a full disk: the lock holds all the same, the pid is a courtesy

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing drops the lock


def refuse_if_port_in_use(host: str, port: int) -> None:
    """Fails at once when something already listens on `host:port`, before
    Ray starts and workers load (minutes, on a large model). The bind in
    `listen` stays the authority; this only fails early.

    Raises:
        AlreadyInUse: the port is taken.
    """
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return  # gRPC reports an unknown host its own way
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC binds: connections of a previous server lingering in
            # TIME_WAIT do not count, a listening socket does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise _port_in_use(host, port, certain=True) from None


def listen(server: grpc.aio.Server, host: str, port: int,
           credentials: grpc.ServerCredentials | None) -> int:
    """Adds the listening port (TLS when `credentials`); returns the port.

    Raises:
        AlreadyInUse: the port cannot be bound.
    """
    address = f"{host}:{port}"
    try:
        bound = (server.add_secure_port(address, credentials) if credentials
                 else server.add_insecure_port(address))
    except RuntimeError:  # recent grpc versions raise ...
        bound = 0
    if not bound:  # ... older ones return 0
        raise _port_in_use(host, port)
    return bound


def _port_in_use(host: str, port: int, certain: bool = False) -> AlreadyInUse:
    cause = ("" if certain else
             f", or {host} is not an address of this machine")
    return AlreadyInUse(f"port {port} on {host} is in use (by another gemma-serve or another "
                        f"program){cause}; stop it or choose another --port.")
