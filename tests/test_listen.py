"""A port that is taken ends the start with one line naming the port and its flag, and leaves
nothing listening: in process (each of the three ports held by a real server of its kind) and
for server.py itself (exit status 1, no traceback)."""

from __future__ import annotations

import socket
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from aiohttp import web
from prometheus_client import CollectorRegistry, start_http_server

from miotts_stream.service.server import ListenError, MioTTSServer, build_engine

from .servers import tiny_codec_options

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def can_bind(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Holders:
    """Real servers holding ports: another gRPC server (grpcio's defaults, SO_REUSEPORT
    included), an aiohttp server, a Prometheus exporter."""

    def __init__(self):
        self._grpc: list[grpc.aio.Server] = []
        self._http: list[web.AppRunner] = []
        self._metrics: list = []

    async def grpc(self) -> int:
        server = grpc.aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._grpc.append(server)
        return port

    async def http(self) -> int:
        runner = web.AppRunner(web.Application())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self._http.append(runner)
        return runner.addresses[0][1]

    async def metrics(self) -> int:
        server, _ = start_http_server(0, addr="127.0.0.1", registry=CollectorRegistry())
        self._metrics.append(server)
        return server.server_port

    async def close(self) -> None:
        for server in self._grpc:
            await server.stop(0)
        for runner in self._http:
            await runner.cleanup()
        for server in self._metrics:
            server.shutdown()
            server.server_close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine(tmp_path_factory):
    engine = await build_engine(tiny_codec_options(llm_standin_rate=50.0))
    yield engine
    await engine.close()


@pytest_asyncio.fixture(loop_scope="module")
async def holders():
    holders = Holders()
    yield holders
    await holders.close()


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("flag", ["--port", "--metrics-port", "--http-port"])
async def test_a_taken_port_is_named_with_its_flag_and_nothing_stays_open(
    engine, holders, tmp_path, flag
):
    held = await {"--port": holders.grpc, "--metrics-port": holders.metrics,
                  "--http-port": holders.http}[flag]()  # fmt: skip
    # The other two ports are fixed free ones, so that what a failed start leaves is visible.
    ports = {"--port": free_port(), "--metrics-port": free_port(), "--http-port": free_port()}
    ports[flag] = held
    options = tiny_codec_options(
        llm_standin_rate=50.0,
        data_dir=str(tmp_path),
        port=ports["--port"],
        metrics_port=ports["--metrics-port"],
        http_port=ports["--http-port"],
    )
    server = MioTTSServer(engine, options)
    with pytest.raises(ListenError) as caught:
        await server.start()
    message = str(caught.value)
    assert message == (
        f"cannot listen on 127.0.0.1:{held} ({flag}): the port is already in use; stop what "
        "holds it, or choose another port"
    )
    for other, port in ports.items():
        if other != flag:
            assert can_bind(port), f"{other} {port} still held after the failed start"


def test_server_py_on_a_taken_port_exits_with_one_line():
    """As reported: another server on the HTTP port made server.py die with a traceback that
    ended in "Event loop is closed"."""
    holder = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)  # listening now
    port = holder.server_port
    try:
        result = subprocess.run(
            [sys.executable, "server.py", "--host", "127.0.0.1", "--port", "0",
             "--no-metrics", "--http-port", str(port), "--llm-standin-rate", "50"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        holder.server_close()
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].endswith(
        f"ERROR miotts_stream.server: cannot listen on 127.0.0.1:{port} (--http-port): the port "
        "is already in use; stop what holds it, or choose another port"
    )
