#!/usr/bin/env python3
"""ImageFlow benchmarks on real tool processes; prints ratios measured side by side in one run."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import grpc
import numpy as np
from imageflow.client.sdk import ImageflowClient
from imageflow.common.structs import dict_to_struct
from imageflow.testing.local import free_port, wait_serving
from imageflow.v1 import (
    image_pb2,
    pipeline_pb2,
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    tool_service_pb2,
    tool_service_pb2_grpc,
)
from numpy.typing import NDArray
from rich.console import Console
from rich.table import Table
from speed import (  # bench/ (this script's folder) is on sys.path
    SUCCEEDED,
    control_plane,
    execute,
    interleaved,
    pipeline,
    speed_bench,
)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MIB = 1024 * 1024
OPTIONS = [("grpc.max_send_message_length", 512 * MIB), ("grpc.max_receive_message_length", 512 * MIB)]
console = Console()


def p50(fn: Callable[[], object], runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


def make_image(width: int, height: int, fmt: str) -> bytes:
    base = cv2.imread(str(ROOT / "samples" / "astronaut.jpg"))
    big = cv2.resize(base, (width, height), interpolation=cv2.INTER_CUBIC)
    ok, data = cv2.imencode(
        fmt, big, [cv2.IMWRITE_JPEG_QUALITY, 90] if fmt == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    )
    assert ok
    return data.tobytes()


def timeline(stub: pipeline_service_pb2_grpc.PipelineServiceStub, definition: pipeline_pb2.Pipeline,
             data: bytes) -> dict[str, tuple[float, float, float]]:  # fmt: skip
    """One execution's steps as (started, succeeded, reported duration) in ms, times from the server's events."""
    request = pipeline_service_pb2.ExecutePipelineRequest(pipeline=definition, inputs={"image": image_pb2.Image(data=data)})
    started: dict[str, float] = {}
    steps: dict[str, tuple[float, float, float]] = {}
    for reply in stub.ExecutePipeline(request):
        event = reply.event
        at = event.time.ToNanoseconds() / 1e6
        if event.HasField("step_started"):
            started[event.step_started.step_id] = at
        elif event.HasField("step_succeeded"):
            done = event.step_succeeded
            steps[done.step_id] = (started[done.step_id], at, done.duration.ToNanoseconds() / 1e6)
        elif event.HasField("execution_finished"):
            assert event.execution_finished.state == SUCCEEDED, event
    return steps


def diamond_parts(stub: pipeline_service_pb2_grpc.PipelineServiceStub, diamond: pipeline_pb2.Pipeline,
                  singles: dict[str, pipeline_pb2.Pipeline], data: bytes, runs: int) -> str:  # fmt: skip
    """Where the diamond's extra time goes, from the events of `runs` more executions of each (interleaved): both
    branches side by side against the longer alone, and the join as its own call against the join inside a
    single's chain (a branch and the join on one service travel in one call there)."""
    both, join_call, alone, join_chained = [], [], {side: [] for side in singles}, []
    for _ in range(runs):
        steps = timeline(stub, diamond, data)
        both.append(max(steps["left"][1], steps["right"][1]) - min(steps["left"][0], steps["right"][0]))
        join_call.append(steps["join"][1] - steps["join"][0])
        for side, single in singles.items():
            steps = timeline(stub, single, data)
            chain_ms = steps["join"][1] - steps[side][0]  # the call that carries the branch and the join
            alone[side].append(chain_ms - steps["join"][2])  # less the join's time as the service reported it
            join_chained.append(steps["join"][2])
    both_ms, longer_ms = statistics.median(both), max(statistics.median(v) for v in alone.values())
    return (f"both branches side by side {both_ms:.1f} ms against the longer alone {longer_ms:.1f} ms "
            f"(x{both_ms / longer_ms:.3f}, frames to and from the service included), the join as its own call "
            f"{statistics.median(join_call):.1f} ms against {statistics.median(join_chained):.1f} ms inside a chain")  # fmt: skip


def service_pair(address: str, frames: list[NDArray[np.uint8]], sigmas: tuple[float, float],
                 in_process: dict[str, Callable[[], None]], runs: int) -> str:  # fmt: skip
    """The diamond's two branches with no control plane: its two blurs sent at once straight to the filter service
    (raw RGB frames in, the requests serialized beforehand as the control plane splices its frames; the left
    branch's image back as raw gray for the join, the right's omitted, as the executor asks) against the longer
    alone, and against both as the two branches of one ProcessBranches call (the frame sent once: what the control
    plane sends), interleaved with the same two blurs on two threads of this process against the longer alone
    (`in_process`: "one", "two"). The difference between the ratios is what the service's transfers and calls add to
    two blurs at once on this machine's cores."""
    loop = asyncio.new_event_loop()

    def image(frame: NDArray[np.uint8]) -> image_pb2.Image:
        return image_pb2.Image(data=frame.tobytes(), media_type="image/x-raw-rgb8", width=frame.shape[1],
                               height=frame.shape[0])  # fmt: skip

    def request(frame: NDArray[np.uint8], sigma: float, omit: bool) -> bytes:
        return tool_service_pb2.ProcessRequest(
            tool="blur", params=dict_to_struct({"method": "gaussian", "radius": sigma}), image=image(frame),
            output_media_type="image/x-raw-gray8", omit_output_image=omit,
        ).SerializeToString()  # fmt: skip

    def branch(sigma: float, omit: bool) -> tool_service_pb2.ProcessChainRequest:
        step = tool_service_pb2.ChainStep(tool="blur", params=dict_to_struct({"method": "gaussian", "radius": sigma}))
        return tool_service_pb2.ProcessChainRequest(steps=[step], output_media_type="image/x-raw-gray8",
                                                    omit_output_image=omit)  # fmt: skip

    left, right = request(frames[0], sigmas[0], False), request(frames[1], sigmas[1], True)
    branches = tool_service_pb2.ProcessBranchesRequest(
        image=image(frames[1]), branches=[branch(sigmas[0], False), branch(sigmas[1], True)]
    ).SerializeToString()

    async def open_channel() -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(address, options=OPTIONS)

    channel = loop.run_until_complete(open_channel())
    process = channel.unary_unary(  # bytes in and out, as they are
        "/imageflow.v1.ToolService/Process", request_serializer=None, response_deserializer=None
    )

    branched = channel.unary_stream(
        "/imageflow.v1.ToolService/ProcessBranches", request_serializer=None, response_deserializer=None
    )

    async def both() -> None:
        await asyncio.gather(process(left), process(right))

    async def one_call() -> None:
        assert len([reply async for reply in branched(branches)]) == 2

    try:
        samples = interleaved({"calls_two": lambda: loop.run_until_complete(both()),
                               "calls_one": lambda: loop.run_until_complete(process(right)),
                               "branches": lambda: loop.run_until_complete(one_call()),
                               **in_process}, runs)  # fmt: skip
    finally:
        loop.run_until_complete(channel.close(grace=None))
        loop.close()
    calls = statistics.median(samples["calls_two"]) / statistics.median(samples["calls_one"])
    threads = statistics.median(samples["two"]) / statistics.median(samples["one"])
    alone = statistics.median(samples["calls_one"])
    branched_ms = statistics.median(samples["branches"])
    return (f"two 6 MB blur calls at once {statistics.median(samples['calls_two']):.1f} ms against the longer alone "
            f"{alone:.1f} ms (x{calls:.3f}); both in one ProcessBranches call (the frame sent once) {branched_ms:.1f} "
            f"ms (x{branched_ms / alone:.3f}); the two blurs on two threads x{threads:.3f} in the same rounds")  # fmt: skip


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def current_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    runs = args.runs
    jpeg_1080 = make_image(1920, 1080, ".jpg")
    with tempfile.TemporaryDirectory() as tmp, control_plane(Path(tmp), embedded=False) as (address, tools, _):
        channel = grpc.insecure_channel(address, options=OPTIONS)
        stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
        tool_channels = {kind: grpc.insecure_channel(a, options=OPTIONS) for kind, a in tools.items()}
        tool_stubs = {kind: tool_service_pb2_grpc.ToolServiceStub(c) for kind, c in tool_channels.items()}

        def process(
            kind: str,
            tool: str,
            params: dict[str, object],
            image: image_pb2.Image,
            out: str = "",
            dets: list[image_pb2.Detection] | None = None,
        ) -> tool_service_pb2.ProcessResponse:
            request = tool_service_pb2.ProcessRequest(
                tool=tool, params=dict_to_struct(params), image=image, output_media_type=out, detections=dets or []
            )
            return tool_stubs[kind].Process(request)  # type: ignore[no-any-return]

        # 1. per tool
        source = image_pb2.Image(data=jpeg_1080)
        faces = process("detection", "detect", {"classes": ["face", "person"]}, source).detections
        table = Table(title="1. tool p50 on a 1920x1080 JPEG (gRPC Process, JPEG out)")
        table.add_column("tool")
        table.add_column("service")
        table.add_column("p50 ms", justify="right")
        cases = [
            ("resize", "resize", {"scale": 0.5}), ("resize", "crop", {"width": 640, "height": 480, "anchor": "center"}),
            ("resize", "rotate", {"angle": -90}), ("resize", "flip", {"direction": "horizontal"}),
            ("resize", "encode", {"format": "webp", "quality": 80}), ("filter", "grayscale", {}), ("filter", "blur", {"radius": 2}),
            ("filter", "sharpen", {}), ("filter", "adjust", {"brightness": 1.2, "contrast": 1.1}), ("filter", "threshold", {"method": "otsu"}),
            ("filter", "edge_detect", {}), ("filter", "draw_boxes", {}), ("filter", "blur_regions", {"method": "pixelate"}),
            ("detection", "detect", {}),
        ]  # fmt: skip
        for kind, tool, params in cases:
            ms = p50(lambda k=kind, t=tool, p=params: process(k, t, p, source, dets=list(faces)), runs)  # type: ignore[misc]
            table.add_row(tool, f"{kind}-grpc" if kind != "detection" else "ai-detection-grpc", f"{ms:.1f}")
        console.print(table)

        # 3. diamond: two ~100 ms branches
        branch = ("blur", {"method": "gaussian", "radius": 12})
        raw_small = process("resize", "resize", {"scale": 1.0 * 1}, source, out="image/x-raw").image
        branch_ms = p50(lambda: process("filter", branch[0], branch[1], raw_small, out="image/x-raw"), 5)
        diamond = pipeline(
            ("root", "flip", {"direction": "horizontal"}, []),
            ("left", branch[0], branch[1], ["root"]),
            ("right", branch[0], {**branch[1], "radius": 12.5}, ["root"]),
            ("join", "grayscale", {}, ["left", "right"]),
        )
        # each branch alone, as the diamond without the other: the longer of the two (right's kernel is the larger) is
        # the longest branch path
        singles = {
            side: pipeline(
                ("root", "flip", {"direction": "horizontal"}, []),
                (side, branch[0], params, ["root"]),
                ("join", "grayscale", {}, [side]),
            )
            for side, params in (("left", branch[1]), ("right", {**branch[1], "radius": 12.5}))
        }
        # The machine's own ceiling for two such branches at once: the two branches' blurs (two frames, as the tool
        # service gets two requests) on two threads of one process (OpenCV single-threaded, as in the tool services)
        # against the longer one alone. No scheduler can beat it.
        rng = np.random.default_rng(3)
        frames = [rng.integers(0, 255, (1080, 1920, 3), np.uint8) for _ in range(2)]
        cv_threads = cv2.getNumThreads()
        cv2.setNumThreads(1)

        def blur(frame: NDArray[np.uint8], sigma: float) -> None:
            cv2.GaussianBlur(frame, (0, 0), sigmaX=sigma, sigmaY=sigma)

        def two_blurs() -> None:
            pair = [
                threading.Thread(target=blur, args=(frame, sigma))
                for frame, sigma in zip(frames, (12, 12.5), strict=True)
            ]
            for thread in pair:
                thread.start()
            for thread in pair:
                thread.join()

        samples = interleaved(  # so all see the same machine state
            {"diamond": lambda: execute(stub, diamond, jpeg_1080, batch=False),
             **{side: (lambda p=p: execute(stub, p, jpeg_1080, batch=False)) for side, p in singles.items()},
             "one": lambda: blur(frames[1], 12.5), "two": two_blurs},
            max(runs, 10), warmup=0,
        )  # fmt: skip
        cv2.setNumThreads(cv_threads)
        diamond_ms, one_ms, two_ms = (statistics.median(samples[k]) for k in ("diamond", "one", "two"))
        longest_ms = max(statistics.median(samples[side]) for side in singles)
        console.print(f"3. diamond DAG (branch ~{branch_ms:.0f} ms each): wall p50 {diamond_ms:.1f} ms, longest branch path p50 "
                      f"{longest_ms:.1f} ms (left {statistics.median(samples['left']):.1f}, right "
                      f"{statistics.median(samples['right']):.1f}), ratio {diamond_ms / longest_ms:.3f} (target <= 1.10); "
                      f"this machine's ceiling: the two branches' blurs at once on two threads {two_ms:.1f} ms / the longer "
                      f"alone {one_ms:.1f} ms = {two_ms / one_ms:.3f}")  # fmt: skip
        console.print(f"3b. where the diamond's extra time goes: {diamond_parts(stub, diamond, singles, jpeg_1080, 10)}")
        cv2.setNumThreads(1)
        pair = service_pair(tools["filter"], frames, (12, 12.5), {"one": lambda: blur(frames[1], 12.5), "two": two_blurs},
                            max(runs, 10))  # fmt: skip
        cv2.setNumThreads(cv_threads)
        console.print(f"3c. the same two blurs through the filter service alone, no control plane: {pair}")

        # 4. 8K chain memory
        png_8k = make_image(7680, 4320, ".png")
        big_chain = pipeline(
            ("flip", "flip", {"direction": "horizontal"}, []),
            ("sharp", "sharpen", {}, ["flip"]),
            ("gray", "grayscale", {}, ["sharp"]),
        )
        # In a control plane of its own (heap that earlier sections grew would hide this one's growth), after one
        # small execution; inputs this large go by ExecutePipelineUpload, in pieces (the SDK decides).
        growths = []
        with control_plane(Path(tmp), embedded=False) as (big_address, _, big_pid), grpc.insecure_channel(
            big_address, options=OPTIONS
        ) as big_channel:
            execute(pipeline_service_pb2_grpc.PipelineServiceStub(big_channel),
                    pipeline(("warm", "flip", {"direction": "vertical"}, [])), jpeg_1080, batch=False)  # fmt: skip
            client = ImageflowClient(channel=big_channel)
            for _ in range(3):
                Path(f"/proc/{big_pid}/clear_refs").write_text("5")  # reset the peak (VmHWM)
                before = current_rss_kib(big_pid)
                events = list(client.execute(big_chain, {"image": image_pb2.Image(data=png_8k)}))
                assert events[-1].execution_finished.state == SUCCEEDED, events[-1]
                growths.append((peak_rss_kib(big_pid) - before) * 1024)
        # The largest of the three is the figure: allocator retention (IMAGEFLOW_MALLOC_MMAP_THRESHOLD) and where gRPC's
        # buffers land move any one run's growth by +-30 MiB here.
        growth = max(growths)
        console.print(f"4. 8K PNG chain (flip -> sharpen -> grayscale, {len(png_8k) / MIB:.1f} MiB encoded, raw frame "
                      f"{7680 * 4320 * 3 / MIB:.0f} MiB; the SDK uploads it in pieces, tools get frames in pieces): "
                      f"control-plane peak RSS growth, largest of three runs in a fresh control plane "
                      f"{growth / MIB:.1f} MiB, ratio to encoded bytes {growth / len(png_8k):.2f} (target <= 3); the three: "
                      + ", ".join(f"{g / MIB:.1f}" for g in growths) + " MiB")  # fmt: skip

        # 5. the diamond again with frames between steps in shared memory (control plane and services on one host)
        with control_plane(Path(tmp), embedded=False, extra={"IMAGEFLOW_TOOL_SHARED_MEMORY": "true"}) as (shm_address, _, _):
            shm_channel = grpc.insecure_channel(shm_address, options=OPTIONS)
            shm_stub = pipeline_service_pb2_grpc.PipelineServiceStub(shm_channel)
            for _ in range(2):
                execute(shm_stub, diamond, jpeg_1080, batch=False)
            shm_samples = interleaved(
                {"diamond": lambda: execute(shm_stub, diamond, jpeg_1080, batch=False),
                 **{side: (lambda p=p: execute(shm_stub, p, jpeg_1080, batch=False)) for side, p in singles.items()}},
                max(runs, 10), warmup=0,
            )  # fmt: skip
            shm_parts = diamond_parts(shm_stub, diamond, singles, jpeg_1080, 10)
            shm_channel.close()
        shm_diamond = statistics.median(shm_samples["diamond"])
        shm_longest = max(statistics.median(shm_samples[side]) for side in singles)
        console.print(f"5. the diamond with IMAGEFLOW_TOOL_SHARED_MEMORY=true: wall p50 {shm_diamond:.1f} ms, longest branch "
                      f"path p50 {shm_longest:.1f} ms, ratio {shm_diamond / shm_longest:.3f} (target <= 1.10); "
                      f"{shm_parts}")  # fmt: skip

        # 6. planner
        request = pipeline_service_pb2.GeneratePipelineRequest(
            instruction="画像を半分に縮小して、人物を検出し、顔をぼかして"
        )
        planner_ms = p50(lambda: stub.GeneratePipeline(request), runs * 2)
        console.print(f"6. GeneratePipeline (offline planner) p50 {planner_ms:.1f} ms")
        for chan in [channel, *tool_channels.values()]:
            chan.close()
    speed_bench(runs)
    llm_bench(runs)
    triton_bench(runs)


def llm_bench(runs: int) -> None:
    """6b. GeneratePipeline through the LLM planner against a local OpenAI-compatible endpoint: cold vs cached."""
    import json as jsonlib

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # the scripted endpoint is the test suite's
    from tests.fake_llm import FakeLlm, Reply

    answer = jsonlib.dumps({"steps": [
        {"id": "small", "tool": "resize", "params": {"scale": 0.5}, "depends_on": [], "explanation": "縮小"},
        {"id": "gray", "tool": "grayscale", "params": {}, "depends_on": ["small"], "explanation": "白黒"},
    ]})  # fmt: skip
    fake = FakeLlm()
    fake.start()
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "key"
        key.write_text("bench-key")
        port = free_port()
        env = {**os.environ, "IMAGEFLOW_PORT": str(port), "IMAGEFLOW_HOST": "127.0.0.1", "IMAGEFLOW_LOG_LEVEL": "warning",
               "IMAGEFLOW_DATABASE_URL": f"sqlite:///{tmp}/llm.db", "IMAGEFLOW_LLM_BASE_URL": fake.base_url,
               "IMAGEFLOW_LLM_MODEL": "bench", "IMAGEFLOW_LLM_API_KEY_FILE": str(key)}  # fmt: skip
        server = subprocess.Popen([str(BIN / "imageflow-server")], env=env, stdout=subprocess.DEVNULL)
        try:
            wait_serving(f"127.0.0.1:{port}", process=server)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
                counter = iter(range(10**6))

                def cold() -> None:
                    fake.replies.append(Reply(answer))
                    stub.GeneratePipeline(
                        pipeline_service_pb2.GeneratePipelineRequest(instruction=f"半分にして白黒に {next(counter)}")
                    )

                def cached() -> None:
                    stub.GeneratePipeline(
                        pipeline_service_pb2.GeneratePipelineRequest(instruction="半分にして白黒に cached")
                    )

                fake.replies.append(Reply(answer))
                cold_ms, cached_ms = p50(cold, runs), p50(cached, runs)
            console.print(f"6b. GeneratePipeline via the LLM planner (local OpenAI-compatible endpoint answering at once): "
                          f"uncached p50 {cold_ms:.1f} ms, cached p50 {cached_ms:.1f} ms")  # fmt: skip
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=15)
            fake.stop()


def triton_bench(runs: int) -> None:
    """7. detection p50: in-process onnxruntime vs Triton gRPC (raw tensors) vs Triton system shared memory."""
    from imageflow.testing.triton import start_triton
    from imageflow.tools.catalog import DEFAULT_MODEL_REPOSITORY
    from imageflow.tools.detection import Detector, OnnxRuntimeBackend
    from imageflow.tools.triton_backend import TritonBackend

    triton = start_triton(free_port(), free_port(), free_port())
    try:
        backends = {
            "in-process onnxruntime": OnnxRuntimeBackend(DEFAULT_MODEL_REPOSITORY),
            "Triton gRPC": TritonBackend(triton.grpc_address),
            "Triton shared memory": TritonBackend(triton.grpc_address, shared_memory=True),
        }
        table = Table(title="7. detect p50 (person + face models, pre/post-processing included)")
        table.add_column("backend")
        for size in ("640x640", "1920x1080"):
            table.add_column(size, justify="right")
        images = {}
        for size in ("640x640", "1920x1080"):
            width, height = map(int, size.split("x"))
            data = make_image(width, height, ".jpg")
            images[size] = cv2.cvtColor(
                cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
            )
        for name, backend in backends.items():
            detector = Detector(backend)
            row = [
                f"{p50(lambda img=img, d=detector: d.detect(img, [], 0.5, 100), runs):.1f} ms"
                for img in images.values()
            ]  # type: ignore[misc]
            table.add_row(name, *row)
        console.print(table)
        for backend in backends.values():
            close = getattr(backend, "close", None)
            if close is not None:
                close()
    finally:
        triton.stop()


if __name__ == "__main__":
    main()
