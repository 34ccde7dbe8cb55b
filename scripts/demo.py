#!/usr/bin/env python3
"""`make demo`: start imageflow-server on embedded defaults, run Japanese instructions through the CLI, stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from imageflow.testing.local import free_port, wait_serving

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "demo-output"
BIN = Path(sys.executable).parent
JOBS = [
    ("画像を半分に縮小して、人物を検出し、顔をぼかして", "astronaut.jpg", "astronaut-face-blurred.png"),
    ("猫を検出して赤い枠で囲んで", "chelsea.jpg", "chelsea-boxes.jpg"),
    ("グレースケールにしてからエッジを検出して、PNGで保存して", "coffee.jpg", "coffee-edges.png"),
]


def main() -> int:
    OUT.mkdir(exist_ok=True)
    for stale in OUT.glob("imageflow.db*"):
        stale.unlink()  # each demo starts from an empty store
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "IMAGEFLOW_PORT": str(port), "IMAGEFLOW_HOST": "127.0.0.1",
           "IMAGEFLOW_DATABASE_URL": f"sqlite:///{OUT / 'imageflow.db'}"}  # fmt: skip
    print(f"starting imageflow-server on {address} (SQLite, embedded tools, offline planner, in-process detection)")
    server = subprocess.Popen([str(BIN / "imageflow-server")], env=env, cwd=ROOT)
    failures = 0
    try:
        wait_serving(address, timeout=60, process=server)
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
    print("\nweb console (type Japanese, watch it run, in a browser): `make console`, then open http://127.0.0.1:8080/")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
