"""The speed figures of the binary path, measured side by side in one run (see docs/PERFORMANCE.md):

- end to end ÷ the one-process OpenCV floor on a 1080p photographic JPEG (embedded defaults), p90 ÷ p50, and two
  bare grpc.aio servers with no control plane ÷ the floor: one doing the floor's work (gRPC's cost here), one doing
  ImageFlow's own work (so end to end minus it is the control plane's own cost);
- executor ÷ the same calls made directly, with separate tool services;
- the per-step slope and the fixed cost (least squares over chains of 1, 2, 4, 8, 16 steps on a 64×64 frame, so tool
  work is negligible), embedded and separate, with per-step events on and off.
"""

from __future__ import annotations

import functools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import grpc
import numpy as np
from imageflow.common.allocator import tune_allocator
from imageflow.common.structs import dict_to_struct
from imageflow.testing.local import free_port, wait_serving
from imageflow.v1 import (
    image_pb2,
    pipeline_pb2,
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    tool_registry_service_pb2,
    tool_registry_service_pb2_grpc,
    tool_service_pb2,
    tool_service_pb2_grpc,
)
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MIB = 1024 * 1024
OPTIONS = [("grpc.max_send_message_length", 512 * MIB), ("grpc.max_receive_message_length", 512 * MIB)]
SUCCEEDED = 3
CHAIN_LENGTHS = (1, 2, 4, 8, 16)
console = Console()


def photo_1080p() -> bytes:
    """A photographic 1920×1080 JPEG of ~500 KB: the three samples side by side with sensor-like grain, q90."""
    astronaut, cat, coffee = (cv2.imread(str(ROOT / "samples" / n)) for n in ("astronaut.jpg", "chelsea.jpg", "coffee.jpg"))
    canvas = np.zeros((1080, 1920, 3), np.uint8)
    canvas[:, :960] = cv2.resize(astronaut, (960, 1080), interpolation=cv2.INTER_CUBIC)
    canvas[:540, 960:] = cv2.resize(cat, (960, 540), interpolation=cv2.INTER_CUBIC)
    canvas[540:, 960:] = cv2.resize(coffee, (960, 540), interpolation=cv2.INTER_CUBIC)
    grain = np.random.default_rng(7).normal(0, 5, canvas.shape)
    noisy = np.clip(canvas.astype(np.float64) + grain, 0, 255).astype(np.uint8)
    ok, data = cv2.imencode(".jpg", noisy, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return data.tobytes()


def tiny_png() -> bytes:
    ok, data = cv2.imencode(".png", np.full((64, 64, 3), 128, np.uint8))
    assert ok
    return data.tobytes()


def pipeline(*steps: tuple[str, str, dict[str, object], list[str]]) -> pipeline_pb2.Pipeline:
    result = pipeline_pb2.Pipeline(name="bench")
    for step_id, tool, params, deps in steps:
        result.steps.add(id=step_id, tool=tool, params=dict_to_struct(params), depends_on=deps)
    return result


CHAIN = pipeline(
    ("small", "resize", {"scale": 0.5}, []),
    ("gray", "grayscale", {}, ["small"]),
    ("soft", "blur", {"radius": 2}, ["gray"]),
)


def flips(count: int) -> pipeline_pb2.Pipeline:
    steps = []
    for index in range(count):
        direction = "horizontal" if index % 2 == 0 else "vertical"
        steps.append((f"s{index}", "flip", {"direction": direction}, [f"s{index - 1}"] if index else []))
    return pipeline(*steps)


def execute(stub: pipeline_service_pb2_grpc.PipelineServiceStub, definition: pipeline_pb2.Pipeline, data: bytes,
            *, omit_step_events: bool = False, batch: bool = True) -> None:  # fmt: skip
    """One ExecutePipeline to the end; `batch` asks for the ready events together (what the SDK and CLI do)."""
    request = pipeline_service_pb2.ExecutePipelineRequest(
        pipeline=definition, inputs={"image": image_pb2.Image(data=data)}, omit_step_events=omit_step_events,
        batch_events=batch,
    )  # fmt: skip
    events = [e for reply in stub.ExecutePipeline(request) for e in (reply.events if batch else [reply.event])]
    assert events and events[-1].execution_finished.state == SUCCEEDED, events[-1]
    assert omit_step_events or len(events) == 2 + 2 * len(definition.steps), len(events)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 3) -> dict[str, list[float]]:
    """Samples of each function, alternating them so all see the same machine state."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            out[name].append((time.perf_counter() - started) * 1000)
    return out


def p90(values: list[float]) -> float:
    return float(np.percentile(values, 90))


def fit(stub: pipeline_service_pb2_grpc.PipelineServiceStub, data: bytes, runs: int, omit: bool,
        batch: bool = True) -> tuple[float, float]:  # fmt: skip
    """Slope (ms per step) and intercept (ms) of the p50 ExecutePipeline time over chains of flips."""
    fns = {str(n): (lambda n=n: execute(stub, flips(n), data, omit_step_events=omit, batch=batch)) for n in CHAIN_LENGTHS}
    medians = {int(k): statistics.median(v) for k, v in interleaved(fns, runs).items()}  # type: ignore[misc]
    slope, intercept = np.polyfit(list(medians), list(medians.values()), 1)
    return float(slope), float(intercept)


def tool_command(kind: str, port: int) -> list[str]:
    """One reference tool service on loopback, quiet."""
    return [str(BIN / "imageflow-tool"), kind, "--port", str(port), "--host", "127.0.0.1", "--log-level", "warning"]


@contextmanager
def control_plane(
    workdir: Path, embedded: bool, extra: dict[str, str] | None = None
) -> Iterator[tuple[str, dict[str, str], int]]:
    """imageflow-server as its own process: embedded defaults, or with three separate tool processes."""
    procs: list[subprocess.Popen[bytes]] = []
    tools: dict[str, str] = {}
    try:
        if not embedded:
            for kind in ("resize", "filter", "detection"):
                port = free_port()
                procs.append(subprocess.Popen(tool_command(kind, port)))
                tools[kind] = f"127.0.0.1:{port}"
        port = free_port()
        env = {**os.environ, "IMAGEFLOW_PORT": str(port), "IMAGEFLOW_HOST": "127.0.0.1",
               "IMAGEFLOW_EMBEDDED_TOOLS": "true" if embedded else "false", "IMAGEFLOW_LOG_LEVEL": "warning",
               "IMAGEFLOW_DATABASE_URL": f"sqlite:///{workdir / f'plane-{free_port()}.db'}", **(extra or {})}  # fmt: skip
        control = subprocess.Popen([str(BIN / "imageflow-server")], env=env, stdout=subprocess.DEVNULL)
        procs.append(control)
        address = f"127.0.0.1:{port}"
        for target in [*tools.values(), address]:
            wait_serving(target)
        with grpc.insecure_channel(address) as channel:
            registry = tool_registry_service_pb2_grpc.ToolRegistryServiceStub(channel)
            for target in tools.values():
                registry.RegisterTool(tool_registry_service_pb2.RegisterToolRequest(address=target))
        yield address, tools, control.pid
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def floor_work(photo: bytes) -> bytes:
    """The chain with OpenCV: decode, INTER_AREA resize, gray, Gaussian blur, encode."""
    img = cv2.imdecode(np.frombuffer(photo, np.uint8), cv2.IMREAD_COLOR)
    img = cv2.resize(img, (960, 540), interpolation=cv2.INTER_AREA)
    return blur_and_encode(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))


def own_work(photo: bytes) -> bytes:
    """What ImageFlow's embedded tools do for the chain on this photo: the JPEG decoded as luma at half size
    (shrink-on-load gives resize ½ and grayscale at once), then the same blur and encode as the floor."""
    return blur_and_encode(cv2.imdecode(np.frombuffer(photo, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_2))


def blur_and_encode(gray: np.ndarray) -> bytes:  # type: ignore[type-arg]
    """The chain's last step on its gray frame: Gaussian blur (σ 2), JPEG at q90 (the tools' default quality)."""
    return bytes(cv2.imencode(".jpg", cv2.GaussianBlur(gray, (0, 0), 2), [cv2.IMWRITE_JPEG_QUALITY, 90])[1])


def floor_of(photo: bytes) -> Callable[[], bytes]:
    """The floor: the chain in this process."""
    return functools.partial(floor_work, photo)


BARE_METHOD = "/bench.Bare/Run"


def serve_bare(port: int, own: bool = False) -> None:
    """A grpc.aio server with no control plane that answers a server stream with a small message, does the floor's
    work on a worker thread and sends the JPEG (what any Python gRPC front of this work costs here); with `own`, it
    does ImageFlow's own work instead, on one OpenCV thread as the embedded tools do. Same allocator tuning as the
    server."""
    import asyncio

    tune_allocator()
    work = floor_work
    if own:
        cv2.setNumThreads(1)
        work = own_work

    async def run(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
        yield b"started"
        yield await asyncio.to_thread(work, request)

    async def main() -> None:
        server = grpc.aio.server(options=OPTIONS)
        handler = grpc.method_handlers_generic_handler("bench.Bare", {"Run": grpc.unary_stream_rpc_method_handler(run)})
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


@contextmanager
def bare_server(own: bool = False) -> Iterator[Callable[[bytes], None]]:
    """`serve_bare` in its own process; yields a call that runs one request to the end."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--bare-server", str(port), *(["own"] if own else [])])
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=OPTIONS)
    try:
        grpc.channel_ready_future(channel).result(timeout=60)
        call = channel.unary_stream(BARE_METHOD)

        def run(photo: bytes) -> None:
            assert len(list(call(photo))) == 2

        yield run
    finally:
        channel.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def untuned_floor_ms(runs: int) -> float:
    """The floor's p50 in a fresh process with glibc's default allocator (for reference; not interleaved)."""
    out = subprocess.run([sys.executable, __file__, "--untuned-floor", str(runs)], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def speed_bench(runs: int) -> dict[str, float]:
    """Prints the speed table and returns its figures."""
    photo, tiny = photo_1080p(), tiny_png()
    figures: dict[str, float] = {"untuned_floor_p50": untuned_floor_ms(runs * 3)}
    # The floor gets the allocator tuning the server and the tool services apply at start (frames reuse heap memory
    # instead of fresh mmaps): the comparison is of the same work under the same allocator.
    tune_allocator()
    floor = floor_of(photo)

    with tempfile.TemporaryDirectory() as tmp:
        with (
            control_plane(Path(tmp), embedded=True) as (address, _, _),
            bare_server() as bare,
            bare_server(own=True) as bare_own,
        ):
            channel = grpc.insecure_channel(address, options=OPTIONS)
            stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
            got = interleaved({"floor": floor, "e2e": lambda: execute(stub, CHAIN, photo),
                               "e2e_single": lambda: execute(stub, CHAIN, photo, batch=False),
                               "bare": lambda: bare(photo), "bare_own": lambda: bare_own(photo)}, runs * 3)  # fmt: skip
            figures["floor_p50"] = statistics.median(got["floor"])
            figures["bare_p50"] = statistics.median(got["bare"])
            figures["bare_own_p50"] = statistics.median(got["bare_own"])
            figures["e2e_p50"] = statistics.median(got["e2e"])
            figures["e2e_single_p50"] = statistics.median(got["e2e_single"])
            figures["e2e_p90"] = p90(got["e2e"])
            figures["embedded_slope"], figures["embedded_fixed"] = fit(stub, tiny, runs, omit=False)
            figures["embedded_slope_single"], figures["embedded_fixed_single"] = fit(stub, tiny, runs, False, False)
            figures["embedded_slope_quiet"], figures["embedded_fixed_quiet"] = fit(stub, tiny, runs, omit=True)
            channel.close()
        for label, extra in (("separate", {}), ("shm", {"IMAGEFLOW_TOOL_SHARED_MEMORY": "true"})):
            with control_plane(Path(tmp), embedded=False, extra=extra) as (address, tools, _):
                channel = grpc.insecure_channel(address, options=OPTIONS)
                stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
                tool_channels = {kind: grpc.insecure_channel(a, options=OPTIONS) for kind, a in tools.items()}
                tool_stubs = {kind: tool_service_pb2_grpc.ToolServiceStub(c) for kind, c in tool_channels.items()}

                def call(kind: str, tool: str, params: dict[str, object], image: image_pb2.Image, out: str,
                         stubs: dict[str, tool_service_pb2_grpc.ToolServiceStub] = tool_stubs) -> image_pb2.Image:  # fmt: skip
                    request = tool_service_pb2.ProcessRequest(tool=tool, params=dict_to_struct(params), image=image,
                                                              output_media_type=out)  # fmt: skip
                    return stubs[kind].Process(request).image  # type: ignore[no-any-return]

                def direct(call: Callable[..., image_pb2.Image] = call, between: str = "image/x-raw") -> None:
                    small = call("resize", "resize", {"scale": 0.5}, image_pb2.Image(data=photo), between)
                    gray = call("filter", "grayscale", {}, small, "image/x-raw")
                    call("filter", "blur", {"radius": 2}, gray, "image/jpeg")

                # `direct_gray` asks resize for raw gray as the executor does (its image goes only to grayscale): the
                # executor against it is the control plane's own cost, without what its plan saves
                got = interleaved({"direct": direct, "direct_gray": functools.partial(direct, between="image/x-raw-gray8"),
                                   "executor": lambda s=stub: execute(s, CHAIN, photo)}, runs * 3)  # fmt: skip
                figures[f"{label}_direct_p50"] = statistics.median(got["direct"])
                figures[f"{label}_direct_gray_p50"] = statistics.median(got["direct_gray"])
                figures[f"{label}_p50"] = statistics.median(got["executor"])
                figures[f"{label}_p90"] = p90(got["executor"])
                if label == "separate":
                    figures["separate_slope"], figures["separate_fixed"] = fit(stub, tiny, runs, omit=False)
                    figures["separate_slope_single"], figures["separate_fixed_single"] = fit(stub, tiny, runs, False, False)
                    figures["separate_slope_quiet"], figures["separate_fixed_quiet"] = fit(stub, tiny, runs, omit=True)
                for chan in [channel, *tool_channels.values()]:
                    chan.close()

    f = figures
    table = Table(title="Speed: the 1080p photographic chain resize ½ → grayscale → blur (JPEG in and out), one run")
    table.add_column("figure")
    table.add_column("measured", justify="right")
    table.add_column("target", justify="right")
    table.add_row("end to end ÷ one-process OpenCV floor (embedded defaults)",
                  f"{f['e2e_p50']:.1f} ÷ {f['floor_p50']:.1f} ms = {f['e2e_p50'] / f['floor_p50']:.2f}", "≤ 1.2")
    table.add_row("the same, one event per stream message (no batch_events)",
                  f"{f['e2e_single_p50']:.1f} ÷ {f['floor_p50']:.1f} ms = {f['e2e_single_p50'] / f['floor_p50']:.2f}", "")
    table.add_row("a bare grpc.aio server doing the floor's work (no control plane) ÷ floor: gRPC's cost here",
                  f"{f['bare_p50']:.1f} ÷ {f['floor_p50']:.1f} ms = {f['bare_p50'] / f['floor_p50']:.2f}", "")
    table.add_row("a bare grpc.aio server doing ImageFlow's own work (luma decode at ½, blur, encode; one OpenCV "
                  "thread) ÷ floor", f"{f['bare_own_p50']:.1f} ÷ {f['floor_p50']:.1f} ms = "
                  f"{f['bare_own_p50'] / f['floor_p50']:.2f}", "")
    table.add_row("end to end − that bare server: the control plane's own cost per execution",
                  f"{f['e2e_p50'] - f['bare_own_p50']:.1f} ms ({f['e2e_p50'] / f['bare_own_p50']:.2f}×)", "")
    table.add_row("the floor with glibc's default allocator (own process, not interleaved)",
                  f"{f['untuned_floor_p50']:.1f} ms", "")
    table.add_row("p90 ÷ p50, embedded", f"{f['e2e_p90'] / f['e2e_p50']:.2f}", "≤ 1.2")
    table.add_row("executor ÷ the same calls made directly (separate services)",
                  f"{f['separate_p50']:.1f} ÷ {f['separate_direct_p50']:.1f} ms = {f['separate_p50'] / f['separate_direct_p50']:.2f}", "≤ 1.0")
    table.add_row("the same with IMAGEFLOW_TOOL_SHARED_MEMORY (frames between steps in /dev/shm)",
                  f"{f['shm_p50']:.1f} ÷ {f['shm_direct_p50']:.1f} ms = {f['shm_p50'] / f['shm_direct_p50']:.2f}", "≤ 1.0")
    table.add_row("executor ÷ direct calls that ask resize for raw gray as the executor does (inline / shared memory)",
                  f"{f['separate_p50'] / f['separate_direct_gray_p50']:.2f} / {f['shm_p50'] / f['shm_direct_gray_p50']:.2f}", "")
    table.add_row("p90 ÷ p50, separate services", f"{f['separate_p90'] / f['separate_p50']:.2f}", "≤ 1.2")
    for mode in ("embedded", "separate"):
        table.add_row(f"per-step slope / fixed cost, {mode}, step events on (batch_events)",
                      f"{f[mode + '_slope']:.2f} ms / {f[mode + '_fixed']:.2f} ms", "≤ 0.3 ms / step")
        table.add_row(f"per-step slope / fixed cost, {mode}, step events on, one per message",
                      f"{f[mode + '_slope_single']:.2f} ms / {f[mode + '_fixed_single']:.2f} ms", "")
        table.add_row(f"per-step slope / fixed cost, {mode}, step events off",
                      f"{f[mode + '_slope_quiet']:.2f} ms / {f[mode + '_fixed_quiet']:.2f} ms", "")  # fmt: skip
    console.print(table)
    return figures


if __name__ == "__main__":
    if sys.argv[1:2] == ["--bare-server"]:
        serve_bare(int(sys.argv[2]), own=sys.argv[3:4] == ["own"])
    elif sys.argv[1:2] == ["--untuned-floor"]:
        fn = floor_of(photo_1080p())
        print(statistics.median(interleaved({"floor": fn}, int(sys.argv[2]))["floor"]))
    else:
        speed_bench(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
