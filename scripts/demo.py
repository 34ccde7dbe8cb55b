#!/usr/bin/env python3
"""`make demo`: start imageflow-server on embedded defaults, run Japanese instructions through the CLI, stop it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "demo-output"
BIN = Path(sys.executable).parent
JOBS = [
    ("画像を半分に縮小して、人物を検出し、顔をぼかして", "astronaut.jpg", "astronaut-face-blurred.png"),
    ("猫を検出して赤い枠で囲んで", "chelsea.jpg", "chelsea-boxes.jpg"),
    ("グレースケールにしてからエッジを検出して、PNGで保存して", "coffee.jpg", "coffee-edges.png"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_serving(address: str, server: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.poll() is not None:
                sys.exit(f"imageflow-server exited with {server.returncode}")
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    sys.exit("imageflow-server did not become SERVING in time")


def main() -> int:
    OUT.mkdir(exist_ok=True)
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "IMAGEFLOW_PORT": str(port), "IMAGEFLOW_HOST": "127.0.0.1",
           "IMAGEFLOW_DATABASE_URL": f"sqlite:///{OUT / 'imageflow.db'}"}  # fmt: skip
    print(f"starting imageflow-server on {address} (SQLite, embedded tools, offline planner, in-process detection)")
    server = subprocess.Popen([str(BIN / "imageflow-server")], env=env, cwd=ROOT)
    failures = 0
    try:
        wait_serving(address, server)
        for instruction, sample, output in JOBS:
            print(f"\n=== {instruction}  ({sample})")
            result = subprocess.run(
                [str(BIN / "imageflow"), "run", instruction, "-i", str(ROOT / "samples" / sample),
                 "-o", str(OUT / output), "--target", address],
                env={**os.environ, "COLUMNS": "120"},
            )  # fmt: skip
            failures += result.returncode != 0
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=15)
    print(f"\nresults written to {OUT}:")
    for path in sorted(OUT.glob("*.*")):
        if path.suffix in (".png", ".jpg", ".webp"):
            print(f"  {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
