"""Where each thread's time went, from a py-spy raw profile (`py-spy record --threads --format raw`).

    python3 bench/pyspy_summary.py idle.txt [--within encode_file_chunks] [--top 20] > summary.json

A raw profile is one line a distinct stack: `thread (TID): NAME;frame (file:line);...;leaf (file:line) COUNT`.
Threads are grouped by name, pool numbers dropped (ThreadPoolExecutor-3_7 -> ThreadPoolExecutor-3). For each
group: its samples, the functions that appear in its stacks (inclusive share: a function counted once a
sample, wherever it is on the stack; threads' and pools' own loops left out) and the leaves (where the
thread was). Recorded with --idle, a waiting thread's samples are kept (a leaf such as `wait (threading.py)`
says it waited); recorded with --gil, only the thread holding the GIL is sampled, so the groups' samples say
who held it.

--within FUNC keeps, of the threads whose stacks ever hold FUNC, only the samples that hold it (the encode
pass's thread: its pass, not the pool's idle time before or after); other threads are kept whole.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")
# the frames under every thread's work (its start, a pool's loop, an event loop's): left out of `inclusive`
PLUMBING = {"threading.py", "thread.py", "base_events.py", "events.py"}


def parse(text: str) -> list[tuple[str, list[str], int]]:
    """(thread label, frames root first, count) of each line of a raw profile."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        if not count.isdigit() or not stack:
            raise ValueError(f"not a py-spy raw line: {line[:120]!r}")
        thread, *frames = stack.split(";")
        out.append((thread, frames, int(count)))
    return out


def thread_group(label: str) -> str:
    """`thread (0x7f..): ThreadPoolExecutor-3_7` -> `ThreadPoolExecutor-3`; a label without a name stays."""
    name = label.split(": ", 1)[1] if ": " in label else label
    return re.sub(r"_\d+$", "", name)


def frame_name(frame: str) -> str:
    """`encode_batch (tasks/encode/files.py:133)` -> `encode_batch (files.py)`: one name a function."""
    match = FRAME.match(frame)
    if not match:
        return frame
    return f"{match['func']} ({Path(match['file']).name})"


def summarise(lines: list[tuple[str, list[str], int]], within: str | None = None, top: int = 20) -> dict:
    filtered = {label for label, frames, _ in lines if within and any(within in f for f in frames)}
    groups: dict[str, dict] = collections.defaultdict(
        lambda: {"samples": 0, "inclusive": collections.Counter(), "leaves": collections.Counter()})
    for label, frames, count in lines:
        if label in filtered and not any(within in f for f in frames):
            continue
        group = groups[thread_group(label)]
        group["samples"] += count
        for name in {frame_name(f) for f in frames}:
            if not name.endswith(tuple(f"({file})" for file in PLUMBING)):
                group["inclusive"][name] += count
        if frames:
            group["leaves"][frame_name(frames[-1])] += count
    total = sum(g["samples"] for g in groups.values())
    out = {"samples": total, "within": within, "threads": {}}
    for name, group in sorted(groups.items(), key=lambda item: -item[1]["samples"]):
        n = group["samples"]
        out["threads"][name] = {
            "samples": n, "share_of_all": round(n / total, 4) if total else 0.0,
            "inclusive": {f: round(c / n, 4) for f, c in group["inclusive"].most_common(top)},
            "leaves": {f: round(c / n, 4) for f, c in group["leaves"].most_common(top)}}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("raw", help="py-spy record --format raw output")
    parser.add_argument("--within", default=None, help="a function name: see the module's docstring")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)
    summary = summarise(parse(Path(args.raw).read_text()), args.within, args.top)
    json.dump(summary, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
