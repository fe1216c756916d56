"""Replicas share API keys: through one key file (a reload, what SIGHUP does, rotates a key on
every replica without a restart) or through PostgreSQL (`--api-keys-db`, read periodically; a
real Debian PostgreSQL the tests start). Real gRPC servers (stand-in LLM, tiny codec)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from miotts_stream.service.pb.miotts.v1 import tts_pb2, tts_pb2_grpc

from .servers import running_servers, tiny_codec_options


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
    replicas = (
        tiny_codec_options(
            data_dir=str(tmp_path / name),
            llm_standin_rate=100.0,
            metrics_port=None,
            api_keys_file=str(keys),
        )
        for name in ("a", "b")
    )
    async with running_servers(replicas, grace=0.2) as servers:
        for server in servers:
            assert await list_voices(server.port, "old-key-0001") == grpc.StatusCode.OK

        keys.write_text("new-key-0002 name=team\n")
        for server in servers:
            assert await server.refresh_keys()  # what SIGHUP runs
        for server in servers:
            assert await list_voices(server.port, "new-key-0002") == grpc.StatusCode.OK
            assert await list_voices(server.port, "old-key-0001") == (
                grpc.StatusCode.UNAUTHENTICATED
            )

        keys.write_text("# emptied by mistake\n")  # refused: the keys in force stay
        assert not await servers[0].refresh_keys()
        assert await list_voices(servers[0].port, "new-key-0002") == grpc.StatusCode.OK


# ---- keys in PostgreSQL (--api-keys-db) ----------------------------------------------------


def test_the_key_store_command_line_and_what_the_table_keeps(postgres_url, capsys):
    import psycopg

    from miotts_stream.service.access import AccessError, AccessPolicy
    from miotts_stream.service.key_store import run

    with pytest.raises(AccessError, match="holds no key"):  # empty: never an open service
        AccessPolicy.from_options([], None, postgres_url)
    assert run(["--db", postgres_url, "add", "--name", "team-a", "--max-streams", "2"]) == 0
    key = capsys.readouterr().out.strip()
    assert len(key) >= 32
    policy = AccessPolicy.from_options([], None, postgres_url)
    found = policy.authenticate(f"Bearer {key}")
    assert (found.name, found.max_streams) == ("team-a", 2)
    assert policy.authenticate("Bearer not-the-key-at-all") is None

    assert run(["--db", postgres_url, "list"]) == 0
    listed = capsys.readouterr().out
    assert "team-a" in listed and key not in listed
    with psycopg.connect(postgres_url) as db:  # only a digest is stored
        rows = db.execute("SELECT * FROM miotts_api_keys").fetchall()
    assert key.encode() not in repr(rows).encode()
    with pytest.raises(AccessError, match="exists already"):
        run(["--db", postgres_url, "add", "--name", "team-a"])
    assert run(["--db", postgres_url, "remove", "--name", "team-a"]) == 0


async def test_keys_added_and_removed_in_the_database_reach_every_replica(
    postgres_server, tmp_path
):
    import psycopg

    from miotts_stream.service.key_store import PostgresKeySource

    url = postgres_server.create_database()
    store = PostgresKeySource(url)
    first = store.add("ops")  # a server refuses to start on an empty key table
    replicas = (
        tiny_codec_options(
            data_dir=str(tmp_path / name),
            llm_standin_rate=100.0,
            metrics_port=None,
            api_keys_db=url,
            api_keys_refresh_s=0.1,
        )
        for name in ("a", "b")
    )
    async with running_servers(replicas, grace=0.2) as servers:

        async def everywhere(key: str, code: grpc.StatusCode) -> None:
            for _ in range(200):  # bounded: the servers read the table every 0.1 s
                codes = [await list_voices(s.port, key) for s in servers]
                if codes == [code, code]:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(f"{key}: {codes}, not {code} on every replica")

        await everywhere(first, grpc.StatusCode.OK)
        team = await asyncio.to_thread(store.add, "team")  # on any machine
        await everywhere(team, grpc.StatusCode.OK)
        await asyncio.to_thread(store.remove, "team")  # revoked
        await everywhere(team, grpc.StatusCode.UNAUTHENTICATED)

        # The database unreachable: the keys in force stay.
        dbname = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
        with psycopg.connect(postgres_server.url("postgres"), autocommit=True) as admin:
            admin.execute(f"ALTER DATABASE {dbname} WITH ALLOW_CONNECTIONS false")
            try:
                assert not await servers[0].refresh_keys()
                assert await list_voices(servers[0].port, first) == grpc.StatusCode.OK
            finally:
                admin.execute(f"ALTER DATABASE {dbname} WITH ALLOW_CONNECTIONS true")
