"""CPU time and processes of the serving stack, read from /proc: who used how much of the machine during a run.

Processes are grouped by what they are (ingress replica, converter replica, Serve proxy, Serve controller, other Ray
processes, this bench process, its client subprocesses, everything else) from their command lines, which Ray sets to
its workers' titles. Figures are in % of ONE core over an interval (a 2-core machine saturates at 200 %); the
machine's own busy share comes from /proc/stat. Used by bench.serving_overhead (per group, busiest threads),
bench.load and bench.soak (this tool's process tree against everyone else's; replica memory).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from app.processes import descendants, parent_pids

INGRESS, CONVERTER, PROXY, CONTROLLER, RAY_OTHER, BENCH, CLIENTS, OTHER = (
    "ingress", "converter", "proxy", "controller", "ray other", "bench", "clients", "other",
)  # fmt: skip
CPU_GROUPS = (INGRESS, CONVERTER, PROXY, CONTROLLER, RAY_OTHER, BENCH, CLIENTS, OTHER)
TICKS = os.sysconf("SC_CLK_TCK")
RAY_PROGRAMS = {"raylet", "gcs_server"}
THREAD_GROUPS = (INGRESS, CONVERTER, PROXY)  # whose threads are reported


def classify(pid: int, parent: int, command: str, me: int) -> str:
    """Which group a process's CPU belongs to, by pid and command line (Ray sets its workers' process titles)."""
    if pid == me:
        return BENCH
    if "ServeReplica" in command and "Ingress" in command:
        return INGRESS
    if "ServeReplica" in command and "Converter" in command:
        return CONVERTER
    if "ProxyActor" in command:
        return PROXY
    if "ServeController" in command:
        return CONTROLLER
    if command.startswith("ray::") or "/ray/" in command or Path(command.split(" ")[0]).name in RAY_PROGRAMS:
        return RAY_OTHER
    if parent == me and "multiprocessing" in command:
        return CLIENTS
    return OTHER


@dataclass(frozen=True)
class CpuSnapshot:
    wall: float
    machine_busy_s: float  # busy CPU seconds summed over all cores since boot
    processes: dict[int, tuple[str, float]]  # pid -> (group, CPU seconds since the process started)
    threads: dict[int, tuple[str, str, float]]  # tid -> (group, thread name, CPU seconds), for THREAD_GROUPS only


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as file:
            return file.read().decode(errors="replace")
    except OSError:  # the process ended meanwhile
        return None


def _stat_fields(stat: str) -> list[str]:
    """/proc/.../stat after "pid (comm) ": state ppid ...; utime and stime are [11] and [12], rss (pages) [21]."""
    return stat[stat.rindex(")") + 2 :].split()


def process_table() -> Iterator[tuple[int, str, list[str]]]:
    """(pid, group, /proc/<pid>/stat fields after the command: see _stat_fields) of every process now."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat, command = _read(f"/proc/{entry}/stat"), _read(f"/proc/{entry}/cmdline")
        if stat is None or command is None:
            continue
        fields = _stat_fields(stat)
        yield int(entry), classify(int(entry), int(fields[1]), command.replace("\0", " "), me), fields


def cpu_snapshot() -> CpuSnapshot:
    processes, threads = {}, {}
    for pid, group, fields in process_table():
        processes[pid] = (group, (int(fields[11]) + int(fields[12])) / TICKS)
        if group in THREAD_GROUPS:
            for tid in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []:
                task_stat = _read(f"/proc/{pid}/task/{tid}/stat")
                if task_stat is not None:
                    name = task_stat[task_stat.index("(") + 1 : task_stat.rindex(")")]
                    task = _stat_fields(task_stat)
                    threads[int(tid)] = (group, name, (int(task[11]) + int(task[12])) / TICKS)
    cpu = (_read("/proc/stat") or "cpu 0 0 0 0").splitlines()[0].split()[1:]
    ticks = [int(value) for value in cpu]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return CpuSnapshot(time.monotonic(), (sum(ticks[:8]) - idle) / TICKS, processes, threads)


def cpu_percent(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    """% of one core per group over the interval, and `machine` for the whole machine (all cores)."""
    wall = after.wall - before.wall
    used: dict[str, float] = dict.fromkeys(CPU_GROUPS, 0.0)
    for pid, (group, seconds) in after.processes.items():
        used[group] += seconds - before.processes.get(pid, (group, 0.0))[1]
    result = {group: 100 * seconds / wall for group, seconds in used.items()}
    result["machine"] = 100 * (after.machine_busy_s - before.machine_busy_s) / wall
    return result


def busiest_threads(before: CpuSnapshot, after: CpuSnapshot, top: int = 3) -> dict[str, list[str]]:
    """Per group in THREAD_GROUPS, its busiest threads as 'name pct' (% of one core): one thread near 100 % while the
    process is below its core count means that thread (an event loop, under the GIL) is the limit."""
    wall = after.wall - before.wall
    used: dict[str, list[tuple[float, str]]] = {group: [] for group in THREAD_GROUPS}
    for tid, (group, name, seconds) in after.threads.items():
        share = 100 * (seconds - before.threads.get(tid, (group, name, 0.0))[2]) / wall
        used[group].append((share, f"{name.strip()} {share:.0f}%"))
    return {group: [label for _, label in sorted(rows, reverse=True)[:top]] for group, rows in used.items()}


def ray_running() -> list[str]:
    """Command lines of running raylets (another Ray on this machine: Serve tests share port 8000)."""
    found = []
    for entry in os.listdir("/proc"):
        command = _read(f"/proc/{entry}/cmdline") if entry.isdigit() else None
        if command and Path(command.split("\0")[0]).name == "raylet":  # the program, not a shell that names it
            found.append(command.replace("\0", " ")[:120])
    return found


# ---- this tool against the rest of the machine --------------------------------------------------------------------


def own_tree() -> set[int]:
    """This process and every process below it (with --local: the Ray it started, the app's replicas)."""
    return {os.getpid(), *descendants(parent_pids(), os.getpid())}


def neighbour_cpu(before: CpuSnapshot, after: CpuSnapshot, ours: set[int]) -> dict[str, float]:
    """% of one core between two snapshots: the whole machine's, this tool's process tree's, and the rest (whoever
    else uses the machine: on a shared one, the noise in the figures)."""
    wall = after.wall - before.wall
    own_s = sum(
        seconds - before.processes.get(pid, ("", 0.0))[1]
        for pid, (_, seconds) in after.processes.items()
        if pid in ours
    )
    machine = 100 * (after.machine_busy_s - before.machine_busy_s) / wall
    return {"machine": machine, "this_tool": 100 * own_s / wall, "others": max(0.0, machine - 100 * own_s / wall)}


def format_cpu(cpu: Mapping[str, float]) -> str:
    return (
        f"CPU over the run, % of one core ({os.cpu_count()} cores): machine {cpu['machine']:.0f}, this tool's "
        f"processes {cpu['this_tool']:.0f}, others {cpu['others']:.0f}"
    )
