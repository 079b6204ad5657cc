"""Processes as /proc shows them: who descends from whom, and CPU time.

Shared by the benchmarks that account for a whole process tree (the
coordinator, its clients, Ray's processes and the workers).
"""

from __future__ import annotations

import collections
import os


def stat_fields(pid: int) -> tuple[str, list[str]] | None:
    """(command name, the fields after it) of /proc/<pid>/stat, or None if
    the process is gone. Field k of proc(5) is fields[k - 3]."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
        name, fields = stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2:]
    except (OSError, ValueError):  # gone, unreadable, or not the expected shape
        return None
    return name, fields.split()


def descendants(root: int) -> set[int]:
    """Every live process whose ancestry leads to `root` (root excluded)."""
    children = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := stat_fields(int(entry))) is not None \
                and len(stat[1]) > 1:
            children[int(stat[1][1])].append(int(entry))
    found, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def cpu_seconds(pid: int) -> tuple[str, float] | None:
    """(command name, user + system CPU seconds so far), None if gone."""
    stat = stat_fields(pid)
    if stat is None:
        return None
    name, fields = stat
    return name, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin_process(pid: int, cores: set[int]) -> None:
    """Every thread of `pid` onto `cores`; threads they start later inherit
    it. Threads that end meanwhile are skipped; a gone process is a no-op."""
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in threads:
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:
            pass
