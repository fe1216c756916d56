"""Replicas share API keys through one key file; a reload (what SIGHUP does) rotates a key on
every replica without a restart. Two real gRPC servers (stand-in LLM, tiny codec)."""

from __future__ import annotations

import grpc

from miotts_stream.service.pb.miotts.v1 import tts_pb2, tts_pb2_grpc
from miotts_stream.service.server import MioTTSServer, ServerOptions, build_engine

from .conftest import TINY_CODECS


async def list_voices(port: int, key: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        try:
            metadata = [("authorization", f"Bearer {key}")]
            await stub.ListVoices(tts_pb2.ListVoicesRequest(), metadata=metadata, timeout=30)
        except grpc.aio.AioRpcError as err:
            return err.code()
        return grpc.StatusCode.OK


async def test_a_rotated_shared_key_file_takes_effect_on_every_replica(tmp_path):
    keys = tmp_path / "keys.txt"  # on a cluster: one Secret mounted into every replica
    keys.write_text("old-key-0001 name=team\n")
    servers = []
    try:
        for name in ("a", "b"):
            options = ServerOptions(
                codec=str(TINY_CODECS["24khz"]),
                data_dir=str(tmp_path / name),
                llm_standin_rate=100.0,
                device="cpu",
                host="127.0.0.1",
                port=0,
                metrics_port=None,
                api_keys_file=str(keys),
            )
            server = MioTTSServer(await build_engine(options), options)
            await server.start()
            servers.append(server)
        for server in servers:
            assert await list_voices(server.port, "old-key-0001") == grpc.StatusCode.OK

        keys.write_text("new-key-0002 name=team\n")
        for server in servers:
            server.reload_keys()
        for server in servers:
            assert await list_voices(server.port, "new-key-0002") == grpc.StatusCode.OK
            assert await list_voices(server.port, "old-key-0001") == (
                grpc.StatusCode.UNAUTHENTICATED
            )

        keys.write_text("# emptied by mistake\n")  # refused: the keys in force stay
        servers[0].reload_keys()
        assert await list_voices(servers[0].port, "new-key-0002") == grpc.StatusCode.OK
    finally:
        for server in servers:
            await server.stop(grace=0.2)
