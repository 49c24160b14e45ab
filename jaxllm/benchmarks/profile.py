"""What the device did during one call: `trace` runs a function under `jax.profiler` (which also
writes a Perfetto trace) and `summarize` reads that trace back, lane by lane (a thread of the host
or a stream of a device): how many XLA ops ran there, their busy time (the union of their
intervals) and which ops took most of it. `bench.py decode --profile` divides these by the tokens
made. A loop bound by kernel launches shows a device busy for a small part of the wall time, with
hundreds of short kernels a token; a loop bound by the device shows it busy nearly all the time.

An event is an XLA op when it carries `hlo_op` (the XLA:CPU thunks, the GPU kernels XLA
launched), or when it runs on a device lane (`/device:...`: kernels and copies, named or not).
Events that enclose the next event on their lane (a `while` around its body's thunks) are dropped,
so nothing is counted twice. Stdlib only: the trace is gzipped JSON.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import time
from collections import defaultdict
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Lane:
    """One thread or stream of the trace: `ops` XLA op events, `busy_us` the union of their
    intervals (microseconds), `top` the ops with the most time: (name, count, total us)."""
    name: str
    ops: int
    busy_us: float
    top: list[tuple[str, int, float]]


def trace(fn, directory: Path) -> tuple[float, Path]:
    """Run fn() under the profiler, writing into `directory`; returns (fn's wall seconds, the
    Perfetto trace's path). fn must block until its work is done (e.g. return host values)."""
    import jax

    directory.mkdir(parents=True, exist_ok=True)
    before = set(directory.rglob("perfetto_trace.json.gz"))
    with jax.profiler.trace(str(directory), create_perfetto_trace=True):
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    written = sorted(set(directory.rglob("perfetto_trace.json.gz")) - before)
    if not written:
        raise RuntimeError(f"jax.profiler wrote no perfetto_trace.json.gz under {directory}")
    return seconds, written[-1]


def _busy(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def _encloses(outer: tuple, inner: tuple) -> bool:
    """Whether event `outer` (ts, dur, ...) contains `inner`, which starts no earlier."""
    return inner[0] < outer[0] + outer[1] and inner[0] + inner[1] <= outer[0] + outer[1]


def summarize(path: Path, module: str | None = None, top: int = 8) -> list[Lane]:
    """The lanes of a Perfetto trace that ran XLA ops, most busy first. `module`: count only ops
    of XLA modules whose name contains it (ops that do not name their module always count)."""
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    process, thread = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            process[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread[e["pid"], e.get("tid")] = e["args"]["name"]
    lanes = defaultdict(list)
    for e in events:
        args = e.get("args") or {}
        on_device = process.get(e.get("pid"), "").startswith("/device:")
        if e.get("ph") != "X" or not ("hlo_op" in args or on_device):
            continue
        if module is not None and "hlo_module" in args and module not in str(args["hlo_module"]):
            continue
        lanes[e["pid"], e.get("tid")].append((float(e["ts"]), float(e.get("dur", 0.0)), str(args.get("hlo_op", e["name"]))))
    out = []
    for (pid, tid), lane in lanes.items():
        lane.sort(key=lambda x: (x[0], -x[1]))
        leaves = [x for x, nxt in zip(lane, lane[1:] + [None]) if nxt is None or not _encloses(x, nxt)]
        per_op = defaultdict(lambda: [0, 0.0])
        for _, dur, name in leaves:
            per_op[name][0] += 1
            per_op[name][1] += dur
        ranked = sorted(((name, n, us) for name, (n, us) in per_op.items()), key=lambda x: -x[2])
        label = f"{process.get(pid, pid)} / {thread.get((pid, tid), tid)}"
        out.append(Lane(label, len(leaves), _busy([(ts, ts + dur) for ts, dur, _ in leaves]), ranked[:top]))
    return sorted(out, key=lambda lane: -lane.busy_us)


def report(lanes: list[Lane], seconds: float, units: int, unit: str = "token", untraced: float | None = None,
           lanes_shown: int = 4) -> list[str]:
    """Lines for the busiest lanes, per `unit` (e.g. per token made) and as a share of the wall time:
    the `untraced` seconds of the same work when given (tracing slows the host), else the traced."""
    wall = seconds if untraced is None else untraced
    lines = [f"traced wall {1e3 * seconds:.1f} ms ({1e3 * seconds / units:.3f} ms a {unit}) over {units} {unit}s"
             + ("" if untraced is None else f"; untraced {1e3 * untraced / units:.3f} ms a {unit}")]
    for lane in lanes[:lanes_shown]:
        lines.append(f"  {lane.name}: {lane.ops:,} ops ({lane.ops / units:.1f} a {unit}), busy "
                     f"{lane.busy_us / 1e3:.1f} ms ({lane.busy_us / 1e3 / units:.3f} ms a {unit}, "
                     f"{100 * lane.busy_us / (1e6 * wall):.0f}% of the {'untraced ' if untraced else ''}wall)")
        lines.extend(f"    {name}: {n:,} x {us / n:.1f} us = {100 * us / max(lane.busy_us, 1e-9):.1f}%"
                     for name, n, us in lane.top)
    if not lanes:
        lines.append("  no XLA op events in the trace")
    return lines
