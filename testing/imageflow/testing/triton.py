"""`imageflow-triton`: start the bundled `tritonserver` (PyPI nvidia-pytriton) on 127.0.0.1 with the CPU repository."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import typer
from imageflow.tools.catalog import DEFAULT_MODEL_REPOSITORY

CPU_VARIANT = Path(__file__).resolve().parent / "triton_cpu"
"""Python-backend configs that run the production ONNX files on the bundled CPU tritonserver."""
MODELS = ("ssd_mobilenetv2_oidv4", "blazeface_short_range", "sepia_tone")


def _pytriton_root() -> Path:
    import pytriton

    return Path(pytriton.__file__).resolve().parent / "tritonserver"


def build_cpu_repository(target: Path, onnx_repository: Path = DEFAULT_MODEL_REPOSITORY) -> Path:
    """A python-backend repository that serves the ONNX files of `onnx_repository` (linked, not copied)."""
    for model in MODELS:
        onnx = onnx_repository / model / "1" / "model.onnx"
        if not onnx.is_file():
            raise FileNotFoundError(f"{onnx} is missing; run `make models`")
        version = target / model / "1"
        version.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(CPU_VARIANT / model / "config.pbtxt", target / model / "config.pbtxt")
        shutil.copyfile(CPU_VARIANT / "onnx_model.py", version / "model.py")
        link = version / "model.onnx"
        if not link.exists():
            link.symlink_to(onnx)
    return target


def _backend_directory(target: Path) -> Path:
    """The python backend with the interpreter's stub copied in (the wheel keeps stubs per Python version)."""
    source = _pytriton_root() / "backends" / "python"
    python = target / "python"
    python.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file():
            shutil.copy2(item, python / item.name)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = _pytriton_root() / "python_backend_stubs" / version / "triton_python_backend_stub"
    shutil.copy2(stub, python / "triton_python_backend_stub")
    return target


@dataclass
class TritonProcess:
    """A running tritonserver."""

    process: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    metrics_port: int
    workdir: Path

    @property
    def grpc_address(self) -> str:
        """Loopback gRPC address."""
        return f"127.0.0.1:{self.grpc_port}"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_triton(
    grpc_port: int, http_port: int, metrics_port: int, *, timeout: float = 120.0, log_file: Path | None = None
) -> TritonProcess:
    """Start tritonserver with the CPU repository and wait until it is ready."""
    workdir = Path(tempfile.mkdtemp(prefix="imageflow-triton-"))
    repository = build_cpu_repository(workdir / "models")
    backends = _backend_directory(workdir / "backends")
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    bundled = _pytriton_root().parents[1] / "nvidia_pytriton.libs"  # the stub's RPATH breaks once it is copied
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(bundled), env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    command = [
        str(_pytriton_root() / "bin" / "tritonserver"),
        f"--model-repository={repository}", f"--backend-directory={backends}",
        f"--grpc-port={grpc_port}", f"--http-port={http_port}", f"--metrics-port={metrics_port}",
        "--grpc-address=127.0.0.1", "--http-address=127.0.0.1", "--allow-metrics=true", "--log-verbose=0",
    ]  # fmt: skip
    output = open(log_file, "wb") if log_file else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    triton = TritonProcess(process, grpc_port, http_port, metrics_port, workdir)
    if not _wait_ready(triton, timeout):
        triton.stop()
        raise RuntimeError(f"tritonserver did not become ready in {timeout:.0f} s")
    return triton


def _wait_ready(triton: TritonProcess, timeout: float) -> bool:
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(triton.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            if triton.process.poll() is not None:
                return False
            try:
                if stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=1).ready and all(
                    stub.ModelReady(service_pb2.ModelReadyRequest(name=m), timeout=1).ready for m in MODELS
                ):
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.25)
    return False


app = typer.Typer(add_completion=False, help="Run the bundled tritonserver with ImageFlow's detection models (CPU).")


@app.command()
def main(
    grpc_port: int = typer.Option(8001, help="gRPC port"),
    http_port: int = typer.Option(8000, help="HTTP port"),
    metrics_port: int = typer.Option(8002, help="metrics port"),
) -> None:
    """Serve until SIGTERM or SIGINT."""
    triton = start_triton(grpc_port, http_port, metrics_port)
    typer.echo(f"tritonserver ready on {triton.grpc_address} (HTTP {http_port}, metrics {metrics_port})", err=True)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping and triton.process.poll() is None:
        time.sleep(0.2)
    triton.stop()
