"""Several LLM servers behind one router: stand-in servers (`python -m
miotts_stream.llm.standin_server`) in their own processes, killed with SIGKILL and restarted.

What must hold: a request whose server is dead is served by the other one (failover before the
first token); requests go to the server with the fewest in flight; a dead server is taken out
and probed back in once it is restarted; a server dying mid-stream ends that stream with
LLMUnavailableError (UNAVAILABLE over gRPC); metrics per server. No timed assertions: every
wait is bounded and polls for a state."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from miotts_stream.llm import LLMRouter, LLMUnavailableError, SamplingOptions
from miotts_stream.llm.router import MID_STREAM_MESSAGE, NO_SERVER_MESSAGE
from miotts_stream.service.pb.miotts.v1 import tts_pb2, tts_pb2_grpc

from .servers import running_server, tiny_codec_options

ROOT = Path(__file__).resolve().parents[1]
LONG_TEXT = "A sentence long enough to keep a slow stand-in busy for a good while. " * 3
SHORT = SamplingOptions(max_tokens=3, seed=1)  # 0.6 s at the stand-ins' 5 codes a second


class StandIn:
    """One stand-in LLM server process on a loopback port."""

    def __init__(self, port: int, rate_hz: float) -> None:
        self.port = port
        self.rate_hz = rate_hz
        self.url = f"http://127.0.0.1:{port}/v1"
        self.process: subprocess.Popen | None = None

    async def start(self) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "miotts_stream.llm.standin_server",
                "--port",
                str(self.port),
                "--rate",
                str(self.rate_hz),
                "--prefill-ms",
                "1",
            ],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        async with aiohttp.ClientSession() as session:
            for _ in range(300):  # up to ~30 s
                assert self.process.poll() is None, "the stand-in exited"
                try:
                    async with session.get(f"http://127.0.0.1:{self.port}/health") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"the stand-in on port {self.port} never answered")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    async def running(self) -> int:
        """Requests the stand-in is streaming now (its own count)."""
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self.port}/metrics") as response,
        ):
            for line in (await response.text()).splitlines():
                if line.startswith("standin_requests_running "):
                    return int(line.split()[1])
        raise AssertionError("no standin_requests_running in /metrics")


@pytest.fixture
async def standins(unused_tcp_port_factory):
    """Two stand-ins: 5 codes a second, so a long request stays in flight while a test looks."""
    servers = [StandIn(unused_tcp_port_factory(), rate_hz=5.0) for _ in range(2)]
    try:
        await asyncio.gather(*(s.start() for s in servers))
        yield servers
    finally:
        for server in servers:
            server.kill()


@pytest.fixture
async def router(standins):
    # Health checks far apart: the tests see only the probes of servers taken out.
    router = LLMRouter(
        [s.url for s in standins], health_interval_s=60.0, probe_min_s=0.1, probe_max_s=0.5
    )
    yield router
    await router.close()


async def collect(stream) -> list[int]:
    return [code async for code in stream]


async def until(predicate, what: str, attempts: int = 200, step_s: float = 0.05) -> None:
    """Polls `predicate()` (sync or async) until true; fails after attempts * step_s."""
    for _ in range(attempts):
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        await asyncio.sleep(step_s)
    raise AssertionError(f"timed out waiting for {what}")


async def test_failover_before_the_first_token_with_one_server_killed(router, standins):
    a, b = router.servers
    standins[0].kill()
    for i in range(4):
        stream = router.stream("Hello there.", SamplingOptions(max_tokens=3, seed=i))
        codes = await asyncio.wait_for(collect(stream), 30)
        assert len(codes) == 3 and stream.finish_reason == "length"
        assert stream.server is b
    # Only the first request tried the dead server: it was taken out at once.
    assert (a.requests, a.up, b.up) == (1, False, True)
    assert a.failures >= 1 and "Connect" in a.last_error
    assert a.in_flight == b.in_flight == 0


async def test_requests_go_to_the_server_with_the_fewest_in_flight(router, standins):
    a, b = router.servers
    streams = []
    for _ in range(4):
        stream = router.stream(LONG_TEXT, SamplingOptions(seed=1))
        assert await asyncio.wait_for(stream.next_codes(), 30)  # in flight now
        streams.append(stream)
    assert [s.server for s in streams] == [a, b, a, b]
    assert (a.in_flight, b.in_flight) == (2, 2)
    assert [await s.running() for s in standins] == [2, 2]

    for stream in streams:
        if stream.server is a:
            await stream.aclose()
    assert (a.in_flight, b.in_flight) == (0, 2)

    async def a_is_idle() -> bool:
        return await standins[0].running() == 0

    await until(a_is_idle, "the stand-in to see the aborts")
    more = []
    for _ in range(2):  # A holds fewer than B each time: both go to A
        stream = router.stream(LONG_TEXT, SamplingOptions(seed=2))
        assert await asyncio.wait_for(stream.next_codes(), 30)
        more.append(stream)
    assert [s.server for s in more] == [a, a]
    assert [await s.running() for s in standins] == [2, 2]

    for stream in streams + more:
        await stream.aclose()
    assert a.in_flight == b.in_flight == 0


async def test_a_killed_server_is_probed_back_in_after_a_restart(router, standins):
    a, b = router.servers
    standins[0].kill()
    stream = router.stream("Hello there.", SHORT)
    await asyncio.wait_for(collect(stream), 30)
    assert stream.server is b and not a.up
    await until(lambda: a.failures >= 2, "a failed probe")  # probes while it is dead fail
    assert not a.up

    await standins[0].start()  # the same port
    await until(lambda: a.up, "the restarted server to be probed back in", 400)
    busy = router.stream(LONG_TEXT, SamplingOptions(seed=3))  # goes to A (fewer requests)
    assert await asyncio.wait_for(busy.next_codes(), 30)
    assert busy.server is a
    after = router.stream("Hello there.", SHORT)
    assert len(await asyncio.wait_for(collect(after), 30)) == 3
    assert after.server is b  # B holds fewer in flight than A
    await busy.aclose()


async def test_a_server_dying_mid_stream_ends_the_stream_unavailable(router, standins):
    stream = router.stream(LONG_TEXT, SamplingOptions(seed=4))
    assert await asyncio.wait_for(stream.next_codes(), 30)
    serving = stream.server
    standins[router.servers.index(serving)].kill()
    with pytest.raises(LLMUnavailableError) as info:
        await asyncio.wait_for(collect(stream), 30)
    assert info.value.client_message == MID_STREAM_MESSAGE
    assert stream.finish_reason == "error"
    assert not serving.up and serving.in_flight == 0
    # Not retried elsewhere: the codes already sent cannot be taken back.
    assert [s.requests for s in router.servers].count(1) == 1


async def test_every_server_down_is_unavailable_after_trying_each(router, standins):
    for standin in standins:
        standin.kill()
    stream = router.stream("Hello there.", SHORT)
    with pytest.raises(LLMUnavailableError) as info:
        await asyncio.wait_for(collect(stream), 30)
    assert info.value.client_message == NO_SERVER_MESSAGE
    assert [s.requests for s in router.servers] == [1, 1]
    assert not any(s.up for s in router.servers)


def test_the_router_refuses_bad_settings():
    with pytest.raises(ValueError, match="at least one"):
        LLMRouter([])
    with pytest.raises(ValueError, match="twice"):
        LLMRouter(["http://127.0.0.1:1/v1", "http://127.0.0.1:1/v1"])


# ---- through the service -------------------------------------------------------------------


async def test_the_service_fails_over_and_reports_a_mid_stream_loss_as_unavailable(
    standins, tmp_path
):
    options = tiny_codec_options(
        data_dir=str(tmp_path),
        llm_base_url=[s.url for s in standins],
        metrics_port=0,
        max_streams=4,
    )
    async with running_server(options) as server:
        engine = server.engine
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = tts_pb2_grpc.TextToSpeechStub(channel)
            standins[0].kill()
            for seed in range(3):  # every stream is served, by the survivor
                config = tts_pb2.SynthesisConfig(
                    voice=tts_pb2.Voice(preset="en_female"),
                    generation=tts_pb2.GenerationOptions(seed=seed, max_tokens=3),
                )
                request = tts_pb2.SynthesizeRequest(config=config, text="Hello.")
                responses = [r async for r in stub.Synthesize(request, timeout=60)]
                assert responses[-1].summary.generated_tokens == 3

            metrics = await scrape(server.metrics_port)
            assert f'miotts_llm_server_up{{server="{standins[0].url}"}} 0.0' in metrics
            assert f'miotts_llm_server_up{{server="{standins[1].url}"}} 1.0' in metrics
            assert f'miotts_llm_server_requests_total{{server="{standins[1].url}"}} 3.0' in metrics

            # The survivor dies after this stream's first audio: the stream ends UNAVAILABLE.
            config = tts_pb2.SynthesisConfig(
                voice=tts_pb2.Voice(preset="en_female"),
                streaming=tts_pb2.StreamingOptions(first_chunk_tokens=2, lookahead_tokens=1),
            )
            call = stub.Synthesize(
                tts_pb2.SynthesizeRequest(config=config, text=LONG_TEXT), timeout=60
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for response in call:
                    if response.WhichOneof("response") == "audio":
                        standins[1].kill()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert info.value.details() == MID_STREAM_MESSAGE
            await until(lambda: not engine.sessions, "the stream's session to be released")

            # With every LLM server out the replica says so in its health, so that a load
            # balancer sends streams elsewhere; one server back makes it SERVING again.
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="miotts.v1.TextToSpeech")

            async def health_is(wanted: int) -> bool:
                return (await health.Check(check, timeout=10)).status == wanted

            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            await until(lambda: health_is(not_serving), "health NOT_SERVING with no server")
            # The process itself is well: its overall status (what liveness probes ask) stays.
            overall = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert overall.status == health_pb2.HealthCheckResponse.SERVING
            await standins[1].start()  # the same port
            serving = health_pb2.HealthCheckResponse.SERVING
            await until(lambda: health_is(serving), "health SERVING with a server back", 1300)


async def scrape(port: int) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        return await response.text()


async def test_a_server_failing_requests_with_500_is_taken_out_and_the_request_moves(
    standins, unused_tcp_port
):
    """A server that is up (its health check answers) but fails every completion."""
    from aiohttp import web

    async def fail(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "engine dead"}}, status=500)

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m"}]})

    app = web.Application()
    app.add_routes([web.post("/v1/chat/completions", fail), web.get("/v1/models", models)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", unused_tcp_port).start()
    broken = f"http://127.0.0.1:{unused_tcp_port}/v1"
    router = LLMRouter([broken, standins[1].url], model="m", health_interval_s=60.0)
    try:
        stream = router.stream("Hello there.", SHORT)
        assert len(await asyncio.wait_for(collect(stream), 30)) == 3
        assert stream.server is router.servers[1]
        assert router.servers[0].failures == 1 and "HTTP 500" in router.servers[0].last_error
    finally:
        await router.close()
        await runner.cleanup()


async def test_with_every_server_out_a_request_that_works_puts_its_server_back(standins):
    # Probes a minute apart: only the request can bring a server back here.
    router = LLMRouter([s.url for s in standins], probe_min_s=60.0, probe_max_s=60.0)
    try:
        for standin in standins:
            standin.kill()
        with pytest.raises(LLMUnavailableError):
            await asyncio.wait_for(collect(router.stream("Hello there.", SHORT)), 30)
        assert not any(s.up for s in router.servers)

        await standins[1].start()
        stream = router.stream("Hello there.", SHORT)
        assert len(await asyncio.wait_for(collect(stream), 30)) == 3
        assert stream.server is router.servers[1] and router.servers[1].up
        assert not router.servers[0].up
    finally:
        await router.close()
