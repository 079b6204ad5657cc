"""Resident memory of a process, as /proc/<pid>/status reports it."""

from __future__ import annotations

FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile")


def memory_status(pid: int | str = "self") -> dict[str, int] | None:
    """Bytes of VmRSS (resident now), VmHWM (the most resident so far),
    RssAnon and RssFile (its anonymous and file-backed parts, e.g. mapped
    weight files), or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            text = handle.read()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            out[key] = int(value.split()[0]) * 1024
    return out or None


def mem_available() -> int:
    """The machine's MemAvailable in bytes (other jobs share it)."""
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0
