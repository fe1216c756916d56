"""Three real `server.py` replicas behind a real HAProxy (Debian's), with the shipped
deploy/haproxy/haproxy.cfg and the documented client retry config
(deploy/grpc/retry_service_config.json).

24 streams run through the proxy. One replica gets SIGTERM (drain), another SIGKILL, mid-load.
What must hold: the draining replica's open streams finish normally; once the proxy's gRPC health
check sees it NOT_SERVING, new streams land on the others; the killed replica's open streams end
with an error and no summary (through HAProxy: CANCELLED, from the RST_STREAM CANCEL that the
proxy sends when a replica's connection dies mid-response; docs/deploy.md); and new streams
started right after the kill, with the documented retry policy, all complete on the survivor.

Streams are held open by the client (config, text, flush, then nothing until released), so the
order of events is set by the test, not by how fast this machine generates audio.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from miotts_stream.llm.vllm_server import free_port
from miotts_stream.service.pb.miotts.v1 import tts_pb2, tts_pb2_grpc

from .conftest import TINY_CODECS

ROOT = Path(__file__).resolve().parents[1]
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
RETRY_CONFIG = ROOT / "deploy" / "grpc" / "retry_service_config.json"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
SERVICE = "miotts.v1.TextToSpeech"
REPLICAS = ("r1", "r2", "r3")
# As docs/deploy.md advises behind this config: longer than its checks take to see NOT_SERVING
# (two checks a second apart).
DRAIN_NOTICE_S = 5.0
MAX_STREAMS = 64  # per replica; the config's `maxconn 64` matches it


# ---- the health check's raw HTTP/2 bytes, rebuilt from the protobuf messages ----------------


def _frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    header = len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream_id.to_bytes(4, "big")
    return header + payload


def _grpc_message(message) -> bytes:
    body = message.SerializeToString()
    return b"\x00" + len(body).to_bytes(4, "big") + body


def _literal(value: bytes) -> bytes:
    assert len(value) < 127  # one-byte length prefix, no Huffman
    return bytes([len(value)]) + value


def expected_health_check() -> tuple[list[bytes], bytes]:
    """What HAProxy must send (three writes) and the reply bytes it must find."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b"")  # + empty SETTINGS
    headers = (
        b"\x83"  # :method POST (static table 3)
        + b"\x86"  # :scheme http (static 6)
        + b"\x04" + _literal(b"/grpc.health.v1.Health/Check")  # :path, literal, name index 4
        + b"\x01" + _literal(b"haproxy")  # :authority, name index 1
        + b"\x0f\x10" + _literal(b"application/grpc")  # content-type, name index 31
        + b"\x00" + _literal(b"te") + _literal(b"trailers")  # new name
    )  # fmt: skip
    request = _grpc_message(health_pb2.HealthCheckRequest(service=SERVICE))
    sent = [
        preface,
        _frame(1, 0x4, 1, headers),  # HEADERS, END_HEADERS
        _frame(0, 0x1, 1, request),  # DATA, END_STREAM
    ]
    serving = _grpc_message(
        health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)
    )
    return sent, serving


def test_health_check_bytes_match_the_config():
    text = HAPROXY_CFG.read_text()
    sends = [
        bytes.fromhex(line.split()[2])
        for line in text.splitlines()
        if line.strip().startswith("tcp-check send-binary")
    ]
    expects = [
        bytes.fromhex(line.split()[3])
        for line in text.splitlines()
        if line.strip().startswith("tcp-check expect binary")
    ]
    sent, serving = expected_health_check()
    assert sends == sent
    assert expects == [serving]
    (default_server,) = [line for line in text.splitlines() if "default-server" in line]
    assert f"maxconn {MAX_STREAMS}" in default_server  # the test's replicas run --max-streams


# ---- processes -----------------------------------------------------------------------------


@dataclass
class Replica:
    name: str
    port: int
    process: subprocess.Popen
    log: Path


def _start_replica(name: str, tmp_path: Path, extra: tuple[str, ...] = ()) -> Replica:
    port = free_port()
    command = [
        sys.executable, str(ROOT / "server.py"),
        "--host", "127.0.0.1", "--port", str(port), "--no-metrics", "--device", "cpu",
        "--codec", str(TINY_CODECS["24khz"]), "--llm-standin-rate", "50",
        "--max-streams", str(MAX_STREAMS), "--data-dir", str(tmp_path / name),
        # The test holds streams open between its steps: long enough drain and idle limits.
        "--drain-timeout-s", "90", "--idle-timeout-s", "90", "--log-level", "WARNING",
        "--drain-notice-s", str(DRAIN_NOTICE_S), "--no-http", *extra,
    ]  # fmt: skip
    log = tmp_path / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    return Replica(name, port, process, log)


async def _serving(port: int) -> bool:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE), timeout=2
            )
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def _haproxy_states(admin_socket: Path) -> dict[str, str]:
    """Server name -> status (UP, DOWN, ...) in the gRPC backend, from the runtime API."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(2)
        sock.connect(str(admin_socket))
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    states = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("pxname") == "grpc_replicas" and row.get("svname") in REPLICAS:
            states[row["svname"]] = row["status"]
    return states


async def _wait_states(admin_socket: Path, want: dict[str, str], what: str) -> None:
    states: dict[str, str] = {}
    for _ in range(150):  # bounded: checks run every second, two to change a state
        states = _haproxy_states(admin_socket)
        if all(states.get(name, "").startswith(state) for name, state in want.items()):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what}: HAProxy states {states}, wanted {want}")


# ---- client streams ------------------------------------------------------------------------


@dataclass
class HeldStream:
    """A stream that speaks one flushed sentence, then waits for `release` to finish."""

    label: str
    release: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    replica: str | None = None
    code: grpc.StatusCode | None = None
    details: str = ""
    got_summary: bool = False
    task: asyncio.Task | None = None

    async def _requests(self):
        config = tts_pb2.SynthesisConfig(generation=tts_pb2.GenerationOptions(max_tokens=20))
        yield tts_pb2.StreamingSynthesizeRequest(config=config)
        yield tts_pb2.StreamingSynthesizeRequest(text=f"Hello from {self.label}. ")
        yield tts_pb2.StreamingSynthesizeRequest(flush=tts_pb2.Flush())
        await self.release.wait()
        yield tts_pb2.StreamingSynthesizeRequest(text="And goodbye.")
        yield tts_pb2.StreamingSynthesizeRequest(end_of_input=tts_pb2.EndOfInput())

    async def run(self, stub) -> None:
        call = stub.StreamingSynthesize(self._requests(), timeout=120)
        try:
            metadata = dict(await call.initial_metadata() or ())
            self.replica = metadata.get("x-miotts-replica")
            async for response in call:
                if response.WhichOneof("response") == "audio":
                    self.started.set()
                elif response.WhichOneof("response") == "summary":
                    self.got_summary = True
        except grpc.aio.AioRpcError:
            pass
        finally:
            self.code = await call.code()
            self.details = await call.details() or ""
            self.started.set()  # also when it failed before any audio

    def start(self, stub) -> HeldStream:
        self.task = asyncio.get_running_loop().create_task(self.run(stub))
        return self


async def _started(streams: list[HeldStream]) -> None:
    await asyncio.wait_for(asyncio.gather(*(s.started.wait() for s in streams)), 60)
    failed = [(s.label, s.code, s.details) for s in streams if s.code is not None]
    assert not failed, f"streams ended before release: {failed}"


async def _finished(streams: list[HeldStream]) -> None:
    for stream in streams:
        stream.release.set()
    await asyncio.wait_for(asyncio.gather(*(s.task for s in streams)), 60)


def _where(streams: list[HeldStream]) -> dict[str, list[str]]:
    placed: dict[str, list[str]] = {}
    for stream in streams:
        placed.setdefault(stream.replica or "?", []).append(stream.label)
    return placed


async def _wait_serving(replicas: list[Replica]) -> None:
    for _ in range(240):  # bounded: a replica with the stand-in LLM starts in seconds
        if all([await _serving(r.port) for r in replicas]):
            return
        for replica in replicas:
            assert replica.process.poll() is None, replica.log.read_text()[-3000:]
        await asyncio.sleep(0.5)
    raise AssertionError("replicas did not become SERVING")


def _proxy_env(tmp_path: Path, grpc_ports: list[int], http_ports: list[int]) -> dict[str, str]:
    """The environment the shipped config reads its addresses from."""
    env = {
        **os.environ,
        "MIOTTS_LB_GRPC_BIND": f"127.0.0.1:{free_port()}",
        "MIOTTS_LB_HTTP_BIND": f"127.0.0.1:{free_port()}",
        "MIOTTS_LB_ADMIN_SOCKET": str(tmp_path / "haproxy.sock"),
    }
    for index, (grpc_port, http_port) in enumerate(zip(grpc_ports, http_ports, strict=True), 1):
        env[f"MIOTTS_R{index}_GRPC"] = f"127.0.0.1:{grpc_port}"
        env[f"MIOTTS_R{index}_HTTP"] = f"127.0.0.1:{http_port}"
    return env


async def _start_haproxy(env: dict[str, str], log: Path) -> subprocess.Popen:
    assert Path(HAPROXY).exists(), "haproxy is missing: scripts/setup.sh installs it (Debian)"
    check = subprocess.run(
        [HAPROXY, "-c", "-f", str(HAPROXY_CFG)], env=env, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    with log.open("w") as out:
        process = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(HAPROXY_CFG)], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    admin_socket = Path(env["MIOTTS_LB_ADMIN_SOCKET"])
    for _ in range(50):
        if admin_socket.exists():
            break
        assert process.poll() is None, log.read_text()[-3000:]
        await asyncio.sleep(0.1)
    await _wait_states(admin_socket, dict.fromkeys(REPLICAS, "UP"), "start")
    return process


@pytest.mark.asyncio
async def test_replicas_behind_haproxy_drain_and_kill(tmp_path):
    replicas = {name: _start_replica(name, tmp_path) for name in REPLICAS}
    # The HTTP API is not served by this test's replicas; its backend follows the gRPC checks
    # (`track`), so addresses nothing listens on are harmless here.
    env = _proxy_env(tmp_path, [r.port for r in replicas.values()], [free_port() for _ in REPLICAS])
    admin_socket = Path(env["MIOTTS_LB_ADMIN_SOCKET"])
    lb_address = env["MIOTTS_LB_GRPC_BIND"]
    haproxy_log = tmp_path / "haproxy.log"
    haproxy = None
    streams: list[HeldStream] = []
    try:
        await _wait_serving(list(replicas.values()))
        haproxy = await _start_haproxy(env, haproxy_log)

        options = [
            ("grpc.service_config", RETRY_CONFIG.read_text()),
            ("grpc.enable_retries", 1),
        ]
        async with grpc.aio.insecure_channel(lb_address, options=options) as channel:
            stub = tts_pb2_grpc.TextToSpeechStub(channel)

            # 1. 24 streams, spread over the three replicas.
            first = [HeldStream(f"first-{i}").start(stub) for i in range(24)]
            streams += first
            await _started(first)
            placed = _where(first)
            assert sorted(placed) == list(REPLICAS), placed
            drained, killed, survivor = "r1", "r2", "r3"

            # 2. SIGTERM r1: its health turns NOT_SERVING, the proxy takes it out. Streams that
            # start before the proxy has noticed are still served (--drain-notice-s).
            replicas[drained].process.send_signal(signal.SIGTERM)
            window = [HeldStream(f"window-{i}").start(stub) for i in range(6)]
            streams += window
            await _wait_states(admin_socket, {drained: "DOWN"}, "after SIGTERM")
            await _started(window)
            assert replicas[drained].process.poll() is None  # still draining its streams

            # 3. New streams land on the survivors only.
            second = [HeldStream(f"second-{i}").start(stub) for i in range(6)]
            streams += second
            await _started(second)
            assert set(_where(second)) <= {killed, survivor}, _where(second)

            # 4. SIGKILL r2 with streams open on it.
            replicas[killed].process.kill()
            replicas[killed].process.wait(timeout=10)
            on_killed = [s for s in first + window + second if s.replica == killed]
            assert on_killed
            await asyncio.wait_for(asyncio.gather(*(s.task for s in on_killed)), 60)
            # The replica's connection died under the proxy, which resets each of its streams
            # towards the client with RST_STREAM CANCEL (HAProxy has no way to send a gRPC
            # status after a response started); grpcio reports that as CANCELLED, a status this
            # client did not cause. Without the proxy the client would see UNAVAILABLE.
            assert all(
                s.code == grpc.StatusCode.CANCELLED
                and "RST_STREAM" in s.details
                and not s.got_summary
                for s in on_killed
            ), [(s.label, s.code, s.details) for s in on_killed]

            # 5. New streams at once, while the proxy may still count r2 as up (its check needs
            # two failures) and r2, now without streams, is leastconn's first choice: the
            # proxy's connection retries (redispatch) and the client's retry policy must bring
            # each of them to the survivor.
            third = [HeldStream(f"third-{i}").start(stub) for i in range(6)]
            streams += third
            await _started(third)
            await _finished(third)
            assert [s.code for s in third] == [grpc.StatusCode.OK] * len(third), [
                (s.label, s.code, s.details) for s in third
            ]
            assert all(s.got_summary for s in third)
            assert set(_where(third)) == {survivor}, _where(third)

            # 6. The drained replica's streams (and the survivor's) finish normally.
            rest = [s for s in first + window + second if s.replica != killed]
            await _finished(rest)
            assert {(s.code, s.got_summary) for s in rest} == {(grpc.StatusCode.OK, True)}, [
                (s.label, s.replica, s.code, s.details)
                for s in rest
                if s.code != grpc.StatusCode.OK
            ]
            assert any(s.replica == drained for s in rest)
        assert replicas[drained].process.wait(timeout=60) == 0
    finally:
        for stream in streams:
            stream.release.set()
            if stream.task is not None and not stream.task.done():
                stream.task.cancel()
        for process in [haproxy, *(r.process for r in replicas.values())]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    with contextlib.suppress(FileNotFoundError):
        log = haproxy_log.read_text()
        assert "grpc_replicas/r1 is DOWN" in log, log[-3000:]
    _ = json.loads(RETRY_CONFIG.read_text())  # the documented file is valid JSON


# The HTTP API (server.py --http-port: OpenAI /v1/audio/speech, WebSocket /v1/stream) through
# the config's http_in / http_replicas sections.
@pytest.mark.asyncio
async def test_http_api_through_haproxy(tmp_path):
    http_port = free_port()
    replica = _start_replica("r1", tmp_path, ("--http-port", str(http_port)))
    # One replica behind all three server lines: enough to show the HTTP path works.
    env = _proxy_env(tmp_path, [replica.port] * 3, [http_port] * 3)
    haproxy = None
    try:
        await _wait_serving([replica])
        haproxy = await _start_haproxy(env, tmp_path / "haproxy.log")
        url = f"http://{env['MIOTTS_LB_HTTP_BIND']}/v1/audio/speech"
        request = {"model": "miotts", "input": "Hello there.", "response_format": "pcm"}
        timeout = aiohttp.ClientTimeout(total=60)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(url, json=request) as response,
        ):
            body = await response.read()
            assert response.status == 200, body[:500]
            assert response.headers["x-miotts-replica"] in REPLICAS
            assert len(body) > 0
    finally:
        for process in (haproxy, replica.process):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=30)


@pytest.mark.asyncio
async def test_drain_notice_serves_new_streams_then_refuses(tmp_path):
    """--drain-notice-s: after SIGTERM health is NOT_SERVING at once, a new stream is still
    served; once the notice is over new streams are refused while open ones finish."""
    replica = _start_replica("r1", tmp_path)
    held = HeldStream("held")
    try:
        await _wait_serving([replica])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{replica.port}") as channel:
            stub = tts_pb2_grpc.TextToSpeechStub(channel)
            held.start(stub)
            await _started([held])
            replica.process.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=SERVICE)
            for _ in range(100):
                reply = await health.Check(request, timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.05)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

            config = tts_pb2.SynthesisConfig(generation=tts_pb2.GenerationOptions(max_tokens=12))
            synthesize = tts_pb2.SynthesizeRequest(config=config, text="Still here.")
            kinds = [r.WhichOneof("response") async for r in stub.Synthesize(synthesize)]
            assert kinds[-1] == "summary"  # served during the notice

            caught = None
            for _ in range(200):  # bounded: the notice is DRAIN_NOTICE_S long
                try:
                    async for _ in stub.Synthesize(synthesize):
                        pass
                except grpc.aio.AioRpcError as error:
                    caught = error
                    break
                await asyncio.sleep(0.1)
            assert caught is not None and caught.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in caught.details()

            await _finished([held])  # the open stream still finishes normally
            assert (held.code, held.got_summary) == (grpc.StatusCode.OK, True), held.details
        assert replica.process.wait(timeout=60) == 0
    finally:
        held.release.set()
        if replica.process.poll() is None:
            replica.process.kill()
            replica.process.wait(timeout=30)
