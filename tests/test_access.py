"""TLS, mTLS and API keys with a standard client (grpcio's ssl_channel_credentials, bearer
metadata), against real servers on loopback sharing one real engine. Certificates are made
here with `cryptography`."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import ssl

import aiohttp
import grpc
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest

from miotts_stream.service.access import UNAUTHENTICATED_MESSAGE
from miotts_stream.service.pb.miotts.v1 import tts_pb2, tts_pb2_grpc
from miotts_stream.service.server import MioTTSServer, ServerOptions, build_engine

from .servers import server_log_lines, vllm_options

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEY_A, KEY_B = "alpha-secret-0123456789", "bravo-secret-9876543210"


@pytest.fixture(autouse=True)
def keys_never_logged(caplog):
    """After every test: no key in any line the process logged, at DEBUG, whatever logger."""
    caplog.set_level(logging.DEBUG)
    yield
    for line in server_log_lines(caplog):
        assert KEY_A not in line and KEY_B not in line, line


# ---- certificates -------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _cert(subject, issuer, public_key, signing_key, *, ca=False, san=None):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(_name("test CA"), _name("test CA"), ca_key.public_key(), ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _cert(_name("localhost"), ca.subject, server_key.public_key(), ca_key, san=san)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _cert(_name("client"), ca.subject, client_key.public_key(), ca_key)
    other_ca_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = _cert(_name("other"), _name("other"), other_ca_key.public_key(), other_ca_key)
    stranger = _cert(_name("stranger"), other_ca.subject, client_key.public_key(), other_ca_key)
    files = {}
    for name, obj in {
        "ca": ca,
        "server": server,
        "server_key": server_key,
        "client": client,
        "client_key": client_key,
        "stranger": stranger,
    }.items():
        path = folder / f"{name}.pem"
        path.write_bytes(_pem(obj))
        files[name] = path
    return files


# ---- servers ------------------------------------------------------------------------------


def _options(**kwargs) -> ServerOptions:
    import tempfile

    return vllm_options(
        data_dir=tempfile.mkdtemp(prefix="miotts-voices-"),  # not the developer's .data/
        max_streams=4,
        metrics_port=None,
        **kwargs,
    )


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine():
    engine = await build_engine(_options())
    yield engine
    await engine.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def servers(engine, pki, tmp_path_factory):
    """Several transports over the one engine: TLS, mTLS, and API keys (plaintext)."""
    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text(f"# comment\n{KEY_A} name=team-a max_streams=1\n\n{KEY_B}\n")
    made = {
        "tls": MioTTSServer(
            engine,
            _options(tls_cert=str(pki["server"]), tls_key=str(pki["server_key"]), http_port=0),
        ),
        "mtls": MioTTSServer(
            engine,
            _options(
                tls_cert=str(pki["server"]),
                tls_key=str(pki["server_key"]),
                tls_client_ca=str(pki["ca"]),
                http_port=0,
            ),
        ),
        "keys": MioTTSServer(engine, _options(api_keys_file=str(keys_file))),
    }
    for server in made.values():
        await server.start()
    yield made
    for server in made.values():  # the engine is the module's: close only the transports
        await server.grpc.stop(0.2)
        if server.http is not None:
            await server.http.stop()


def _request(text: str = "Secure.") -> tts_pb2.SynthesizeRequest:
    return tts_pb2.SynthesizeRequest(
        config=tts_pb2.SynthesisConfig(generation=tts_pb2.GenerationOptions(seed=1, max_tokens=12)),
        text=text,
    )


async def _synthesize(channel, metadata=None) -> tts_pb2.SynthesisSummary:
    stub = tts_pb2_grpc.TextToSpeechStub(channel)
    summary = None
    async for response in stub.Synthesize(_request(), metadata=metadata, timeout=60):
        if response.WhichOneof("response") == "summary":
            summary = response.summary
    assert summary is not None and summary.generated_tokens > 0
    return summary


def _tls_channel(port: int, pki, *, client_cert: str | None = None):
    chain = key = None
    if client_cert is not None:
        chain = pki[client_cert].read_bytes()
        key = pki["client_key"].read_bytes()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(), private_key=key, certificate_chain=chain
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


# ---- TLS ----------------------------------------------------------------------------------


async def test_tls_serves_a_standard_client(servers, pki):
    async with _tls_channel(servers["tls"].port, pki) as channel:
        await _synthesize(channel)
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_tls_port_refuses_plaintext(servers):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{servers['tls'].port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _synthesize(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_requires_a_client_certificate_from_the_ca(servers, pki):
    port = servers["mtls"].port
    async with _tls_channel(port, pki, client_cert="client") as channel:
        await _synthesize(channel)
    for client_cert in (None, "stranger"):
        async with _tls_channel(port, pki, client_cert=client_cert) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await _synthesize(channel)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, client_cert


async def test_https_on_the_http_port_with_the_same_certificates(servers, pki):
    """The HTTP port serves TLS (and mTLS) with gRPC's certificates, never plaintext beside it."""
    trusted = ssl.create_default_context(cafile=str(pki["ca"]))
    async with aiohttp.ClientSession() as http:
        url = f"https://127.0.0.1:{servers['tls'].http_port}/health"
        async with http.get(url, ssl=trusted) as response:
            assert response.status == 200
        with pytest.raises(aiohttp.ClientError):  # plaintext HTTP on the TLS port
            await http.get(url.replace("https:", "http:"))
        mtls = f"https://127.0.0.1:{servers['mtls'].http_port}/health"
        with pytest.raises(aiohttp.ClientError):  # no client certificate
            await http.get(mtls, ssl=trusted)
        trusted.load_cert_chain(str(pki["client"]), str(pki["client_key"]))
        async with http.get(mtls, ssl=trusted) as response:
            assert response.status == 200


# ---- API keys -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        (("authorization", "Bearer wrong-key-0000000000"),),
        (("authorization", f"Bearer {KEY_A[:-1]}"),),  # all but the last character
        (("authorization", KEY_A),),  # no scheme
        (("authorization", f"Basic {KEY_A}"),),
        (("x-api-key", KEY_A),),
    ],
)
async def test_missing_or_wrong_keys_get_one_answer(servers, metadata):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{servers['keys'].port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _synthesize(channel, metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert caught.value.details() == UNAUTHENTICATED_MESSAGE
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListVoices(tts_pb2.ListVoicesRequest(), metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_valid_key_is_served_and_counted_by_name(servers, caplog):
    caplog.set_level(logging.DEBUG)
    server = servers["keys"]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        await _synthesize(channel, (("authorization", f"Bearer {KEY_A}"),))
        await _synthesize(channel, (("authorization", f"bearer {KEY_B}"),))
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        voices = await stub.ListVoices(
            tts_pb2.ListVoicesRequest(), metadata=(("authorization", f"Bearer {KEY_B}"),)
        )
        assert voices.voices
    metrics = generate_latest(server.metrics.registry).decode()
    assert 'miotts_requests_by_key_total{code="OK",key="team-a"} 1.0' in metrics
    assert 'miotts_requests_by_key_total{code="OK",key="key-4"} 2.0' in metrics
    for secret in (KEY_A, KEY_B):
        assert secret not in metrics and secret not in caplog.text


async def test_health_and_reflection_stay_open(servers):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{servers['keys'].port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = [s.name async for r in responses for s in r.list_services_response.service]
        assert "miotts.v1.TextToSpeech" in names


async def test_a_keys_max_streams_is_its_own_limit(servers):
    server = servers["keys"]
    release = asyncio.Event()

    async def held():
        yield tts_pb2.StreamingSynthesizeRequest(config=tts_pb2.SynthesisConfig())
        await release.wait()
        yield tts_pb2.StreamingSynthesizeRequest(cancel=tts_pb2.Cancel())

    team_a = (("authorization", f"Bearer {KEY_A}"),)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        first = stub.StreamingSynthesize(held(), metadata=team_a)
        reader = asyncio.ensure_future(first.code())
        for _ in range(200):
            if server.admission.streams_by_key["team-a"] == 1:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _synthesize(channel, team_a)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "api key team-a" in caught.value.details()
        assert KEY_A not in caught.value.details()
        await _synthesize(channel, (("authorization", f"Bearer {KEY_B}"),))  # others unaffected
        release.set()
        assert await reader == grpc.StatusCode.OK
        for _ in range(200):
            if server.admission.streams_by_key["team-a"] == 0:
                break
            await asyncio.sleep(0.01)
        await _synthesize(channel, team_a)


# ---- the example client -------------------------------------------------------------------


async def _client_example(*args: str) -> tuple[int, str]:
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(root / "client_example.py"),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    out, _ = await asyncio.wait_for(process.communicate(), 240)
    return process.returncode, out.decode()


async def test_client_example_with_tls_and_keys(servers, pki, tmp_path):
    wav = tmp_path / "out.wav"
    code, out = await _client_example(
        "Over TLS, word by word.", "--stream-text", "--word-delay", "0",
        "--server", f"127.0.0.1:{servers['mtls'].port}", "--tls-ca", str(pki["ca"]),
        "--tls-cert", str(pki["client"]), "--tls-key", str(pki["client_key"]),
        "--out", str(wav), "--timeout", "120",
    )  # fmt: skip
    assert code == 0, out
    assert wav.stat().st_size > 44
    code, out = await _client_example(
        "Who am I?", "--server", f"127.0.0.1:{servers['keys'].port}", "--api-key", "nope-nope-nope"
    )
    assert code == 1
    assert f"UNAUTHENTICATED: {UNAUTHENTICATED_MESSAGE}" in out
