"""The process tree of this machine, read from /proc (Linux): who started whom. Used by the local cluster to find
everything a node's processes started, and by the benchmarks to tell their own processes from the machine's."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path


def parent_pids() -> dict[int, int]:
    """pid -> parent pid of every process now (one that ends meanwhile is left out)."""
    parents = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name, in parentheses, may hold spaces: the parent's pid is the 2nd field after it.
            parents[int(entry.parent.name)] = int(entry.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return parents


def descendants(parents: Mapping[int, int], *roots: int) -> set[int]:
    """Every process below the `roots` (not the roots themselves) in the tree given as pid -> parent pid."""
    children: dict[int, list[int]] = defaultdict(list)
    for pid, parent in parents.items():
        children[parent].append(pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children[todo.pop()]:
            if child not in found:
                found.add(child)
                todo.append(child)
    return found
