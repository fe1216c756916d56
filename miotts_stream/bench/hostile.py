"""Hostile traffic on the HTTP port, measured: what decompression bombs cost the server's
memory, and when slow and idle clients are disconnected.

    python -m miotts_stream.bench.hostile [--root CHECKOUT] [--seconds 60 600 ...] [--skip-slow]

Starts `server.py` (built-in codec, the stand-in LLM, no keys: an open server, as anyone may
reach it) on loopback and
  bombs   POSTs FLAC files of a constant signal at 384 kHz to /v1/voices, declaring 60 to
          3600 s (and the same lengths with no length in the header, so that only decoding can
          find it), after one real clone (the speaker encoder loaded); per file: its size, the
          answer, how long it took, and the server's peak resident memory during the request
          above its level before (Linux: /proc/PID/clear_refs resets the peak);
  slow    opens, all at once, the slow clients the HTTP time limits are for (an idle socket, a
          head a byte a second, a body that stalls, a body a byte a second, a kept-alive
          connection left idle) and says when the server closed each, beside its limit; then
          fills --http-max-connections with idle sockets and times the answer to one more.
--root runs another checkout's server.py (e.g. the main branch, to see the bombs before);
the slow clients then wait at most 90 s each.

`flac_bomb` writes a FLAC file of a constant signal frame by frame (CONSTANT subframes: about
15 bytes per 65535 samples), so a file of a few kilobytes declares, and holds, an hour at
384 kHz; `declare=False` leaves the length out of the header. `wav_header` writes a WAV whose
header claims any rate and channel count. The tests use both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

FLAC_MAX_BLOCK = 65535


def _crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def _flac_frame_number(n: int) -> bytes:
    """FLAC's frame number: UTF-8's variable-length coding, extended to 36 bits."""
    if n < 0x80:
        return bytes([n])
    for length in range(2, 8):
        if n < 1 << (5 * length + 1):
            tail = []
            for _ in range(length - 1):
                tail.append(0x80 | (n & 0x3F))
                n >>= 6
            return bytes([((0xFF << (8 - length)) & 0xFF) | n, *reversed(tail)])
    raise ValueError(f"frame number {n} does not fit")


def flac_bomb(seconds: float, rate: int, *, declare: bool = True, level: int = 1000) -> bytes:
    """A mono 16-bit FLAC of `seconds` of the constant `level`, at `rate` Hz (at most
    1,048,575); `declare`: STREAMINFO gives the total length (else 0: unknown)."""
    total = int(seconds * rate)
    # STREAMINFO: block sizes, frame sizes unknown, then 20 bits rate, 3 bits channels - 1,
    # 5 bits bits-per-sample - 1, 36 bits total samples; then an MD5 of zeros (unchecked).
    packed = (rate << 44) | (0 << 41) | (15 << 36) | (total if declare else 0)
    info = struct.pack(">HH", FLAC_MAX_BLOCK, FLAC_MAX_BLOCK) + bytes(6) + packed.to_bytes(8)
    out = bytearray(b"fLaC" + bytes([0x80, 0, 0, 34]) + info + bytes(16))
    done = number = 0
    while done < total:
        samples = min(FLAC_MAX_BLOCK, total - done)
        # Sync, fixed blocks; block size in 16 bits at the end, rate from STREAMINFO; mono,
        # 16 bits per sample.
        header = bytes([0xFF, 0xF8, 0x70, 0x08]) + _flac_frame_number(number)
        header += struct.pack(">H", samples - 1)
        header += bytes([_crc8(header)])
        frame = header + b"\x00" + struct.pack(">h", level)  # one CONSTANT subframe
        out += frame + struct.pack(">H", _crc16(frame))
        done += samples
        number += 1
    return bytes(out)


def wav_header(rate: int, channels: int, data: bytes = b"") -> bytes:
    """A 16-bit PCM WAV file claiming `rate` and `channels`, holding `data`."""
    block = 2 * channels
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


# ---- the benchmark ------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
BOMB_RATE = 384000
BOMB_SECONDS = (60, 600, 1800, 3600)
SLOW_WAIT_S = 90  # how long a slow client waits for the server to close it


def _status_mb(pid: int, name: str) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{name}:\s+(\d+) kB", text).group(1)) / 1024


async def _raw(port: int, request: bytes, timeout: float = 600) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _voice_upload(voice_id: str, audio: bytes) -> bytes:
    boundary = "miottsbenchboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="voice_id"\r\n\r\n{voice_id}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="audio"; filename="a"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + audio
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        "POST /v1/voices HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def bombs(pid: int, port: int, lengths: list[int]) -> list[list]:
    import numpy as np

    t = np.arange(3 * 24000) / 24000
    clip = (0.3 * np.sin(2 * np.pi * 140 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(
        np.float32
    )
    pcm = np.round(clip * 32767).astype("<i2").tobytes()
    status, body = await _raw(port, _voice_upload("bench_warm", wav_header(24000, 1, pcm)))
    if status != 201:
        raise RuntimeError(f"the warm-up clone failed: {status} {body[:200]!r}")
    rows = []
    for declare in (True, False):
        for seconds in lengths:
            data = flac_bomb(seconds, BOMB_RATE, declare=declare)
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            before = _status_mb(pid, "VmRSS")
            started = time.perf_counter()
            status, body = await _raw(port, _voice_upload("bench_bomb", data))
            took = time.perf_counter() - started
            rise = _status_mb(pid, "VmHWM") - before
            try:
                answer = json.loads(body)["error"]["message"]
            except (ValueError, KeyError):
                answer = body[:60].decode(errors="replace")
            rows.append(
                [
                    f"{seconds} s",
                    "yes" if declare else "no",
                    f"{len(data) / 1024:.0f} KiB",
                    status,
                    f"{took:.2f} s",
                    f"{before:.0f} MB +{rise:.1f} MB",
                    answer[:60],
                ]
            )
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    return rows


async def _closed_after(reader: asyncio.StreamReader, since: float) -> str:
    try:
        await asyncio.wait_for(reader.read(), SLOW_WAIT_S)
    except TimeoutError:
        return f"open after {SLOW_WAIT_S} s"
    except ConnectionError:
        pass
    return f"{time.monotonic() - since:.2f} s"


async def _drip(writer: asyncio.StreamWriter, data: bytes, every_s: float) -> None:
    with contextlib.suppress(ConnectionError):
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(every_s)


async def _slow_client(port: int, kind: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    since = time.monotonic()
    dripping = None
    post = (
        b"POST /v1/audio/speech HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    if kind == "slow head":
        head = b"GET /health HTTP/1.1\r\nHost: bench\r\nX-Pad: " + b"a" * 200
        dripping = asyncio.ensure_future(_drip(writer, head, 1.0))
    elif kind in ("stalled body", "slow body"):
        writer.write(post + b'{"input": "' + b"a" * 9)
        await writer.drain()
        since = time.monotonic()
        if kind == "slow body":
            dripping = asyncio.ensure_future(_drip(writer, b"a" * 980, 1.0))
    elif kind == "idle keep-alive":
        writer.write(b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(re.search(rb"Content-Length: (\d+)", head).group(1)))
        since = time.monotonic()
    result = await _closed_after(reader, since)
    if dripping is not None:
        dripping.cancel()
    writer.close()
    return result


SLOW_CLIENTS = {
    "idle socket": ("--http-head-timeout-s", "from connecting"),
    "slow head": ("--http-head-timeout-s", "1 byte/s, from connecting"),
    "stalled body": ("--http-body-timeout-s", "20 of 1000 bytes, from the head"),
    "slow body": ("--http-body-timeout-s", "1 byte/s, from the head"),
    "idle keep-alive": ("--http-keepalive-timeout-s", "from the response"),
}


async def slow_clients(port: int) -> list[list]:
    from miotts_stream.service.options import ServerOptions

    limits = ServerOptions().http
    limit_of = {
        "--http-head-timeout-s": limits.http_head_timeout_s,
        "--http-body-timeout-s": limits.http_body_timeout_s,
        "--http-keepalive-timeout-s": limits.http_keepalive_timeout_s,
    }
    results = await asyncio.gather(*(_slow_client(port, kind) for kind in SLOW_CLIENTS))
    rows = [
        [kind, f"{flag} {limit_of[flag]:g}", what, result]
        for (kind, (flag, what)), result in zip(SLOW_CLIENTS.items(), results, strict=True)
    ]
    cap = limits.http_max_connections
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(cap)]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        first = await asyncio.wait_for(reader.readline(), SLOW_WAIT_S)
        answer = f"{first.decode().strip()} after {time.monotonic() - started:.3f} s"
    except (TimeoutError, ConnectionError) as err:
        answer = f"no answer ({type(err).__name__})"
    writer.close()
    for _, w in held:
        w.close()
    rows.append([f"connection {cap + 1}", f"--http-max-connections {cap}", "the rest idle", answer])
    return rows


async def wait_http(port: int, process: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server.py exited with status {process.returncode}")
        with contextlib.suppress(OSError, ValueError, IndexError, asyncio.TimeoutError):
            status, _ = await _raw(port, b"GET /health HTTP/1.0\r\n\r\n", timeout=2)
            if status == 200:
                return
        await asyncio.sleep(1)
    raise TimeoutError(f"server.py not serving HTTP after {timeout} s")


async def main_async(args) -> None:
    from miotts_stream.llm.vllm_server import free_port

    from .common import table
    from .e2e import stop_process

    port, http_port = free_port(), free_port()
    command = [
        sys.executable, str(Path(args.root) / "server.py"), "--host", "127.0.0.1",
        "--port", str(port), "--http-port", str(http_port), "--no-metrics",
        "--llm-standin-rate", "50", "--data-dir", args.data_dir, "--log-level", "WARNING",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=args.root, env=os.environ.copy())
    try:
        await wait_http(http_port, process)
        print(f"server.py from {args.root}, pid {process.pid}, HTTP on {http_port}", flush=True)
        rows = await bombs(process.pid, http_port, args.seconds)
        print()
        print(f"bombs: FLAC of a constant signal at {BOMB_RATE} Hz, POST /v1/voices")
        headers = [
            "length",
            "declared",
            "file",
            "status",
            "answered in",
            "RSS + peak rise",
            "answer",
        ]
        print(table(headers, rows))
        if not args.skip_slow:
            rows = await slow_clients(http_port)
            print()
            print("slow clients, all at once (the server's default limits)")
            print(table(["client", "limit", "what", "closed after"], rows))
    finally:
        stop_process(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(ROOT), help="the checkout whose server.py runs")
    parser.add_argument("--skip-slow", action="store_true", help="bombs only")
    parser.add_argument(
        "--seconds",
        type=int,
        nargs="+",
        default=list(BOMB_SECONDS),
        help="the lengths the bombs declare (a whole decode takes 6 MB a second of them)",
    )
    parser.add_argument(
        "--data-dir", default=None, help="the server's voice store (default: a temporary one)"
    )
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        args.data_dir = args.data_dir or scratch
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
