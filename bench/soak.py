"""Soak: N real-time streams kept live for a long time (30 minutes by default); a row per interval with the block
latency, misses, refusals and the memory (RSS) of the ingress and converter replicas; a verdict at the end: did
latency and RSS stay flat?

Usage (from the repo root):

    # A local app this tool starts (see bench/load.py --local), in a private network namespace on a shared machine:
    unshare -n sh -c 'ip link set lo up && .venv/bin/python -m bench.soak --local --streams 4 --minutes 30'
    .venv/bin/python -m bench.soak --local --streams 4 --minutes 3 --interval 30 --json /tmp/soak.json
    # Any deployment:
    .venv/bin/python -m bench.soak --url https://vc.example.com --api-key KEY --voice VOICE_ID --streams 16

Options: those of bench/load.py (--url/--api-key/--voice/--reference or --local/--converter, --streams (4), --ramp,
--input, --json), and --minutes (30), --interval seconds per row (60), --stream-seconds (30): each stream sends that
much input and then a new one starts at once in its place, so that N are live all the time (the last ones are cut to
end with the soak; a refused stream waits the server's retry_after_s before it tries again). The streams, their
figures and their definitions are bench/load.py's (its docstring): a row counts the blocks whose first audio came
back during its interval and the streams that started in it.

Memory: RSS of the processes Ray titles ServeReplica...Ingress, ServeReplica...Converter and ProxyActor, summed per
kind, read from /proc at the end of each interval (bench/cpu_usage.py's process table). With --local only the
processes this tool started (its descendants) count, so other Ray users on the machine do not; with --url every such
process on this machine counts (none when the deployment runs elsewhere: the columns show -).

Verdict: flat when the last interval's p50 server latency is at most LATENCY_FLAT times the first's and the ingress's
and converter's RSS at most RSS_FLAT times theirs (p99 and the proxy's RSS are shown, not judged: a 60 s p99 on a
shared machine is mostly the neighbours). The first interval follows the warm-up stream, so start-up is not in it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from app.processes import descendants
from app.transport.protocol import FRAME_MS
from bench.common import figure, write_json
from bench.cpu_usage import CONVERTER, INGRESS, PROXY, cpu_snapshot, neighbour_cpu, own_tree, process_table
from bench.load import (
    Flatness,
    Ledger,
    Tally,
    Target,
    add_target_args,
    check_target_args,
    flatness,
    format_report,
    open_target,
    read_input,
    report_meta,
    run_one_stream,
    warm_up,
)
from bench.streams import phases
from client.stream_client import encode_packets

LATENCY_FLAT = 1.25  # last / first interval p50; the shared 2-core machines move a p50 by ~10-20 % on their own
RSS_FLAT = 1.05  # of ~800 MiB (torch and Ray loaded): 40 MiB; allocator noise stays well under that
RSS_GROUPS = (INGRESS, CONVERTER, PROXY)
JUDGED_RSS = (INGRESS, CONVERTER)
SATURATED = 0.95  # of all cores busy
MIN_STREAM_S = 1.0  # a slot never restarts faster than this (a server that refuses at once must not spin it)
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


# ---- pure parts ---------------------------------------------------------------------------------------------------


def interval_row(
    number: int, end_s: float, tally: Tally, rss_mib: Mapping[str, float | None], cpu: Mapping[str, float]
) -> dict[str, Any]:
    summary = tally.summary()
    return {
        "interval": number,
        "end_s": end_s,
        "streams_started": summary["streams_started"],
        "blocks": summary["blocks"],
        "server_p50_ms": summary["server_ms"]["p50"],
        "server_p99_ms": summary["server_ms"]["p99"],
        "client_p50_ms": summary["client_ms"]["p50"],
        "client_p99_ms": summary["client_ms"]["p99"],
        "misses": summary["misses"],
        "dropped_blocks": summary["dropped_blocks"],
        "refusals": sum(summary["refusals"].values()),
        "errors": summary["errors"],
        "rss_mib": dict(rss_mib),
        "cpu_percent": dict(cpu),
    }


def overall(checks: Sequence[Flatness]) -> bool | None:
    """Flat when every check that could be made is flat; None when none could be made."""
    known = [check.flat for check in checks if check.flat is not None]
    return all(known) if known else None


def saturated(cpu: Mapping[str, float], cores: int) -> bool:
    """Was the machine's CPU (nearly) all in use: then latency measures the neighbours as much as the service."""
    return cpu["machine"] >= SATURATED * 100 * cores


def verdict(rows: Sequence[Mapping[str, Any]], cores: int) -> dict[str, Any]:
    """Last interval against the first: latency (p50 judged, p99 shown) and RSS per replica kind; whether the machine
    was saturated in either (a latency verdict then says little about the service)."""
    if not rows:
        return {"flat": None}
    first, last = rows[0], rows[-1]
    latency = flatness(first["server_p50_ms"], last["server_p50_ms"], LATENCY_FLAT)
    rss = {group: flatness(first["rss_mib"][group], last["rss_mib"][group], RSS_FLAT) for group in RSS_GROUPS}
    return {
        "latency_p50": latency,
        "latency_p99": flatness(first["server_p99_ms"], last["server_p99_ms"], LATENCY_FLAT),
        "rss": rss,
        "flat": overall([latency, *(rss[group] for group in JUDGED_RSS)]),
        "saturated": [saturated(row["cpu_percent"], cores) for row in (first, last)],
        "others_cpu_percent": [row["cpu_percent"]["others"] for row in (first, last)],
    }


# ---- memory -------------------------------------------------------------------------------------------------------


def replica_rss_mib(only_under: int | None) -> dict[str, float | None]:
    """RSS in MiB per replica kind, summed over its processes; only those below pid `only_under` when given."""
    table = list(process_table())
    mine = None if only_under is None else descendants({pid: int(f[1]) for pid, _, f in table}, only_under)
    rss: dict[str, float] = {}
    for pid, group, fields in table:
        if group in RSS_GROUPS and (mine is None or pid in mine):
            rss[group] = rss.get(group, 0.0) + int(fields[21]) * PAGE_BYTES / 2**20  # [21]: rss in pages
    return {group: rss.get(group) for group in RSS_GROUPS}


# ---- the soak -----------------------------------------------------------------------------------------------------


async def keep_live(
    target: Target, packets: Sequence[bytes], ledger: Ledger, delay_s: float, stop_at: float, numbers: Iterator[int]
) -> None:
    """One slot: streams back to back until `stop_at`, the last one cut to end then."""
    await asyncio.sleep(delay_s)
    while (remaining := stop_at - time.monotonic()) > MIN_STREAM_S:
        started = time.monotonic()
        count = min(len(packets), int(remaining * 1000 / FRAME_MS))
        retry_after = await run_one_stream(target, next(numbers), packets[:count], ledger)
        pause = MIN_STREAM_S - (time.monotonic() - started)
        if retry_after is not None:
            pause = max(pause, retry_after)
        await asyncio.sleep(max(0.0, min(pause, stop_at - time.monotonic())))


async def soak(
    target: Target, packets: Sequence[bytes], args: argparse.Namespace, rss_root: int | None
) -> tuple[list[dict[str, Any]], list[Tally]]:
    """Runs the slots and prints a row per interval; returns the rows, and the tallies of every interval and of what
    came after the last one (the streams that were still ending)."""
    ledger = Ledger()
    start = time.monotonic()
    stop_at = start + 60 * args.minutes
    numbers = itertools.count()
    offsets = phases(args.streams, args.ramp, aligned=args.ramp == 0)
    slots = [asyncio.create_task(keep_live(target, packets, ledger, offset, stop_at, numbers)) for offset in offsets]
    rows: list[dict[str, Any]] = []
    tallies: list[Tally] = []
    tick = start + args.interval
    cpu_before = cpu_snapshot()
    while tick <= stop_at + 1e-6:
        await asyncio.sleep(max(0.0, tick - time.monotonic()))
        tallies.append(ledger.rotate())
        cpu_after = cpu_snapshot()
        cpu = neighbour_cpu(cpu_before, cpu_after, own_tree())
        cpu_before = cpu_after
        row = interval_row(len(rows) + 1, tick - start, tallies[-1], replica_rss_mib(rss_root), cpu)
        rows.append(row)
        print(format_row(row), flush=True)
        tick += args.interval
    await asyncio.gather(*slots)
    return rows, [*tallies, ledger.rotate()]


# ---- reporting ----------------------------------------------------------------------------------------------------


HEADER = (
    f"{'t':>6} {'new':>4}{'blocks':>7} | {'server p50':>10}{'p99':>7} | {'client p50':>10}{'p99':>7} | "
    f"{'miss':>4}{'drop':>5}{'refused':>8}{'err':>4} | RSS MiB {'ingress':>8}{'convert':>8}{'proxy':>7} | "
    f"{'CPU %: ours':>11}{'others':>7}"
)


def format_row(row: Mapping[str, Any]) -> str:
    rss = row["rss_mib"]
    return (
        f"{row['end_s'] / 60:>5.1f}m {row['streams_started']:>4}{row['blocks']:>7} | "
        f"{figure(row['server_p50_ms']):>10}{figure(row['server_p99_ms']):>7} | "
        f"{figure(row['client_p50_ms']):>10}{figure(row['client_p99_ms']):>7} | "
        f"{row['misses']:>4}{row['dropped_blocks']:>5}{row['refusals']:>8}{row['errors']:>4} | "
        f"{'':>7} {figure(rss[INGRESS], 0):>8}{figure(rss[CONVERTER], 0):>8}{figure(rss[PROXY], 0):>7} | "
        f"{row['cpu_percent']['this_tool']:>11.0f}{row['cpu_percent']['others']:>7.0f}"
    )


def _judged(name: str, check: Flatness, limit: float, unit: str, judged: bool = True) -> str:
    if check.ratio is None:
        return f"{name}: no data"
    change = f"{name}: {figure(check.first)} -> {figure(check.last)} {unit} (x{check.ratio:.2f}"
    if not judged:
        return f"{change}; shown, not judged)"
    return f"{change}, limit x{limit:.2f}) {'flat' if check.flat else 'NOT flat'}"


def format_verdict(result: Mapping[str, Any]) -> str:
    if "latency_p50" not in result:
        return "verdict: no interval completed"
    lines = [
        _judged("server latency p50", result["latency_p50"], LATENCY_FLAT, "ms"),
        _judged("server latency p99", result["latency_p99"], LATENCY_FLAT, "ms", judged=False),
    ]
    for group in RSS_GROUPS:
        lines.append(_judged(f"RSS {group}", result["rss"][group], RSS_FLAT, "MiB", judged=group in JUDGED_RSS))
    if any(result["saturated"]):
        first, last = result["others_cpu_percent"]
        lines.append(
            f"warning: the machine's CPU was saturated in the first and/or last interval (other work used {first:.0f} "
            f"-> {last:.0f} % of a core): the latency there measures the neighbours as much as the service"
        )
    overall_state = {True: "FLAT", False: "NOT FLAT", None: "UNKNOWN (no figures to compare)"}[result["flat"]]
    lines.append(f"verdict: {overall_state} (last interval vs first)")
    return "\n".join(lines)


# ---- entry point --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_target_args(parser)
    parser.add_argument("--minutes", type=float, default=30.0, help="how long (%(default)s)")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds per row (%(default)s)")
    parser.add_argument("--stream-seconds", type=float, default=30.0, help="input per stream (%(default)s)")
    args = parser.parse_args(argv)
    check_target_args(parser, args)
    if args.interval < 5 or args.minutes * 60 < args.interval or args.stream_seconds < 2:
        parser.error("--interval must be at least 5 s and at most the soak, --stream-seconds at least 2")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the soak, printing a row per interval and the verdict; returns the report."""
    args = parse_args(argv)
    audio = read_input(args.input, args.stream_seconds)
    packets = encode_packets(audio)
    rss_root = os.getpid() if args.local else None
    with open_target(args, max_sessions=2 * args.streams + 1) as target:
        warm_up(target, audio)
        load_before, cpu_before = os.getloadavg()[0], cpu_snapshot()
        print(
            f"Soak | {target.description} | {args.streams} streams live for {args.minutes:g} min, streams of "
            f"{args.stream_seconds:g} s back to back | a row every {args.interval:g} s | {os.cpu_count()} CPUs",
            flush=True,
        )
        print(HEADER, flush=True)
        rows, tallies = asyncio.run(soak(target, packets, args, rss_root))
        load_after, cpu_after = os.getloadavg()[0], cpu_snapshot()
        cpu = neighbour_cpu(cpu_before, cpu_after, own_tree())
    total = Tally.merged(tallies)
    block_ms = total.blocks[0].block_ms if total.blocks else 0.0
    load = (load_before, load_after)
    meta = report_meta("Soak, all intervals", args, target, args.stream_seconds, block_ms, load, cpu)
    report: dict[str, Any] = {
        "meta": meta,
        "rows": rows,
        "verdict": verdict(rows, os.cpu_count() or 1),
        "total": total.summary(),
    }
    print()
    print(format_report(report["total"], meta))
    print()
    print(format_verdict(report["verdict"]))
    if args.json is not None:
        write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
