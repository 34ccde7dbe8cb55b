"""Where the control plane's time goes during the 3-step chain: py-spy samples `imageflow-server` (embedded defaults,
or `--separate` tool services) while this script runs the 1080p chain in a loop, then prints each thread's share and
the main thread's split between waiting, gRPC/asyncio machinery and ImageFlow's own code. `--flips N` runs a chain of
N flips on a 64×64 PNG instead (tool work negligible: run it with 1 and 16 to see what each step costs).

    .venv/bin/python bench/profile.py [--seconds 20] [--separate] [--flips N] [--raw out.txt]

py-spy attaches with ptrace (root, or `kernel.yama.ptrace_scope=0`). It samples without pausing the process
(`--nonblocking`), so the execution rate while profiling is close to the bench's.
"""

from __future__ import annotations

import argparse
import collections
import linecache
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from imageflow.v1 import pipeline_service_pb2_grpc
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from speed import CHAIN, OPTIONS, control_plane, execute, flips, photo_1080p, tiny_png

BIN = Path(sys.executable).parent
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
BLOCKING = re.compile(r"\.(select|wait|acquire|poll|result)\(|\.get\(\)")
"""A top frame on a line like these is a thread parked in a C call (py-spy still counts it without --idle): a
selector, a lock or condition, a queue's `get()` (a dict's `get(key)` always has an argument, so it is not one)."""
RATE_HZ = 1000
OWN_CODE = "/imageflow/"
MACHINERY = {"Handle._run", "BaseSelectorEventLoop._read_from_self", "BaseEventLoop._run_once"}
console = Console()


def waiting(frame: re.Match[str]) -> bool:
    """True when the frame's source line is a blocking call (the thread is parked, not working)."""
    line = frame.group("line")
    return line is not None and bool(BLOCKING.search(linecache.getline(frame.group("file"), int(line))))


def parse(raw: Path) -> tuple[collections.Counter[str], collections.Counter[str], collections.Counter[str]]:
    """py-spy's raw (collapsed) output: busy samples per thread, the main thread's samples by kind and its ImageFlow
    functions (inclusive)."""
    threads: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():  # a frame's text can hold a line break (a SQL string, say)
            continue
        frames = stack.split(";")
        samples = int(count)
        thread = re.sub(r"^thread \(\d+\): ", "", frames[0])
        names = [m for m in (FRAME.match(f) for f in frames[1:]) if m]
        if not names:
            continue
        if not waiting(names[-1]):
            threads[re.sub(r"_\d+$", "", thread)] += samples
        if thread != "MainThread":
            continue
        function = names[-1].group("function")
        # what a callback of the loop runs: the frames above the first Handle._run (the loop itself is below it)
        runs = [i for i, m in enumerate(names) if m.group("function") == "Handle._run"]
        called = names[runs[0] + 1 :] if runs else []
        own = [m for m in called if OWN_CODE in m.group("file")]
        if waiting(names[-1]):
            kinds["waiting (epoll)"] += samples
        elif own:
            kinds["ImageFlow code (and what it calls)"] += samples
        elif function in MACHINERY:
            kinds["gRPC / asyncio machinery (Cython callbacks, wake-ups)"] += samples
        else:
            kinds["other Python (asyncio, grpc.aio, libraries)"] += samples
        for name in {f"{m.group('function')} ({m.group('file').split(OWN_CODE)[-1]})" for m in own}:
            inclusive[name] += samples
    return threads, kinds, inclusive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--separate", action="store_true", help="tool services in their own processes")
    parser.add_argument("--flips", type=int, default=0, help="a chain of N flips on a 64x64 PNG instead")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw output here")
    args = parser.parse_args()
    definition, photo = (flips(args.flips), tiny_png()) if args.flips else (CHAIN, photo_1080p())
    with tempfile.TemporaryDirectory() as tmp:
        raw = args.raw or Path(tmp) / "profile.txt"
        with control_plane(Path(tmp), embedded=not args.separate) as (address, _, pid):
            channel = grpc.insecure_channel(address, options=OPTIONS)
            stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
            for _ in range(20):
                execute(stub, definition, photo)
            spy = subprocess.Popen(
                [str(BIN / "py-spy"), "record", "--pid", str(pid), "--rate", str(RATE_HZ), "--format", "raw",
                 "--output", str(raw), "--duration", str(args.seconds), "--threads", "--nonblocking", "--full-filenames"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            executions, began = 0, time.monotonic()
            while spy.poll() is None:
                execute(stub, definition, photo)
                executions += 1
            elapsed = time.monotonic() - began
            channel.close()
            if spy.returncode != 0:
                sys.exit(f"py-spy failed: {spy.stderr.read().decode() if spy.stderr else spy.returncode}")
        threads, kinds, inclusive = parse(raw)

    total = sum(threads.values())
    console.print(
        f"{executions} executions in {elapsed:.1f} s ({elapsed / executions * 1000:.1f} ms each while sampled)"
    )
    per_run = 1000 / RATE_HZ / executions  # ms of a thread's time per execution, per sample

    main_total = sum(kinds.values())  # busy and waiting
    show("Busy threads of the control plane (samples not parked in a blocking call)", "thread",
         threads.most_common(8), total, per_run)  # fmt: skip
    show("The main thread (the event loop)", "where", kinds.most_common(), main_total, per_run)
    show("ImageFlow functions on the main thread (inclusive)", "function", inclusive.most_common(15), main_total,
         per_run, digits=2)  # fmt: skip


def show(title: str, what: str, rows: list[tuple[str, int]], total: int, per_run: float, digits: int = 1) -> None:
    """A table of sample counts: each row's share of `total` and its milliseconds per execution."""
    table = Table(title=title)
    table.add_column(what)
    table.add_column("share", justify="right")
    table.add_column("ms per execution", justify="right")
    for name, samples in rows:
        table.add_row(name, f"{samples / total:.{digits - 1}%}", f"{samples * per_run:.{digits}f}")
    console.print(table)

if __name__ == "__main__":
    main()
