"""Load test of the service with a stand-in LLM: how many streams it holds in real time.

    python -m miotts_stream.bench.load [--levels 1 16 64] [--rate 50] [--codec tiny-24khz]
        [--source inprocess|openai] [--encoding PCM_S16LE] [--device cpu] [--find-max]

The speech LLM is replaced by a stand-in that writes random speech codes at `--rate` per second
per request after `--prefill-ms` (in the server's process, or over HTTP from
`miotts_stream.llm.standin_server` with `--source openai`), so the LLM's own speed drops out and
what is measured is the service: decoding, scheduling, encoding, transport. The server runs as
a subprocess on loopback (`server.py`); this process is the client. Per level, that many
StreamingSynthesize calls start at once, each two sentences of up to `--seconds` of audio, and:

  first audio   from end_of_input to the first audio chunk (p50 / p95 / p99);
  last byte     from end_of_input to the last audio chunk (p50);
  underruns     times playback ran dry, playback starting at the first chunk (0 ms buffer) or
                `--buffer-ms` after it; a dry spell pauses playback until the chunk comes;
  loop lag      p99 of the server's event-loop timer lateness (its /metrics histogram);
  steps/s, windows/step   the decode loop's batched steps and their mean size;
  CPU           the server process's CPU time / wall time (200% = both cores of 2).

`--find-max` then searches for the most streams with no underrun behind `--buffer-ms`.
`--baseline DIR` runs the same levels against another checkout's server.py first (for
instance an older commit in a git worktree) and prints both in one table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from miotts_stream.llm.vllm_server import free_port
from miotts_stream.service.pb.miotts.v1 import tts_pb2, tts_pb2_grpc

from .common import dry_spells, table
from .e2e import stop_process, wait_serving

ROOT = Path(__file__).resolve().parents[2]
TINY_CODECS = {
    "tiny-24khz": ROOT / "tests" / "fixtures" / "miocodec" / "tiny-24khz",
    "tiny-44khz": ROOT / "tests" / "fixtures" / "miocodec" / "tiny-44khz",
}
# Two sentences, each long enough that the stand-in speaks its full share of --seconds.
TEXT = (
    "The quick brown fox jumps over the lazy dog, while the sun sets slowly behind the hills. "
    "Everyone agrees that it was a lovely evening, and nobody wanted to go home just yet."
)


@dataclass
class StreamResult:
    end_of_input: float = 0.0
    arrivals: list[float] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    rate: int = 24000
    error: str | None = None

    def underruns(self, buffer_s: float) -> tuple[int, float]:
        """(dry spells, seconds dry) of a player starting `buffer_s` after the first chunk."""
        return dry_spells(self.arrivals, self.samples, self.rate, buffer_s)


async def one_stream(stub, config: tts_pb2.SynthesisConfig, timeout: float) -> StreamResult:
    result = StreamResult()

    async def requests():
        yield tts_pb2.StreamingSynthesizeRequest(config=config)
        yield tts_pb2.StreamingSynthesizeRequest(text=TEXT)
        result.end_of_input = time.perf_counter()
        yield tts_pb2.StreamingSynthesizeRequest(end_of_input=tts_pb2.EndOfInput())

    try:
        async for response in stub.StreamingSynthesize(requests(), timeout=timeout):
            kind = response.WhichOneof("response")
            if kind == "audio" and response.audio.num_samples:
                result.arrivals.append(time.perf_counter())
                result.samples.append(response.audio.num_samples)
            elif kind == "summary":
                result.rate = response.summary.sample_rate_hz
    except grpc.aio.AioRpcError as err:
        result.error = f"{err.code().name}: {err.details()}"
    return result


class ServerProbe:
    """Reads the server's /metrics and its process CPU time."""

    def __init__(self, pid: int, metrics_url: str):
        self.pid = pid
        self.metrics_url = metrics_url

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def snapshot(self) -> dict:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as reply:
            text = reply.read().decode()
        snap: dict = {"lag_buckets": {}, "cpu": self.cpu_seconds(), "time": time.perf_counter()}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "miotts_event_loop_lag_seconds_bucket":
                    snap["lag_buckets"][float(sample.labels["le"])] = sample.value
                elif sample.name == "miotts_decode_steps":
                    snap["steps"] = sample.value
                elif sample.name == "miotts_decode_windows":
                    snap["windows"] = sample.value
        return snap


def lag_p99_ms(before: dict, after: dict) -> float:
    """Upper bound of the bucket holding the 99th percentile of the lag samples in between."""
    bounds = sorted(after["lag_buckets"])
    counts = [after["lag_buckets"][b] - before["lag_buckets"].get(b, 0) for b in bounds]
    total = counts[-1]
    if total <= 0:
        return float("nan")
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= 0.99 * total:
            return bound * 1000
    return float("inf")


@dataclass
class LevelReport:
    streams: int
    results: list[StreamResult]
    before: dict
    after: dict

    @property
    def ok(self) -> list[StreamResult]:
        return [r for r in self.results if r.error is None and r.arrivals]

    def underruns(self, buffer_s: float) -> int:
        return sum(r.underruns(buffer_s)[0] for r in self.ok)

    def row(self, buffer_s: float) -> list:
        ok = self.ok
        errors = len(self.results) - len(ok)
        if not ok:
            return [self.streams, "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", errors]
        ttfa = np.array([r.arrivals[0] - r.end_of_input for r in ok]) * 1000
        ttlb = np.array([r.arrivals[-1] - r.end_of_input for r in ok]) * 1000
        audio = np.mean([sum(r.samples) / r.rate for r in ok])
        wall = self.after["time"] - self.before["time"]
        steps = self.after["steps"] - self.before["steps"]
        windows = self.after["windows"] - self.before["windows"]
        cpu = (self.after["cpu"] - self.before["cpu"]) / wall * 100
        return [
            self.streams,
            f"{audio:.1f}",
            "{:.0f} / {:.0f} / {:.0f}".format(*np.percentile(ttfa, [50, 95, 99])),
            f"{np.percentile(ttlb, 50):.0f}",
            self.underruns(0.0),
            self.underruns(buffer_s),
            f"{lag_p99_ms(self.before, self.after):.0f}",
            f"{steps / wall:.1f}",
            f"{windows / max(steps, 1):.1f}",
            f"{cpu:.0f}%",
            errors,
        ]


HEADERS = [
    "streams",
    "audio s",
    "first audio p50/p95/p99 ms",
    "last byte p50 ms",
    "underruns 0 ms",
    "underruns {buffer} ms",
    "loop lag p99 ms",
    "steps/s",
    "windows/step",
    "server CPU",
    "errors",
]


async def run_level(
    address: str, probe: ServerProbe, streams: int, args, first_audio: str = "balanced"
) -> LevelReport:
    config = tts_pb2.SynthesisConfig(
        audio=tts_pb2.AudioFormat(
            encoding=tts_pb2.Encoding.Value(args.encoding), sample_rate_hz=args.sample_rate
        ),
        generation=tts_pb2.GenerationOptions(max_tokens=int(25 * args.seconds / 2)),
        streaming=tts_pb2.StreamingOptions(
            first_audio=tts_pb2.FirstAudio.Value(f"FIRST_AUDIO_{first_audio.upper()}")
        ),
    )
    before = probe.snapshot()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        timeout = 60 + 10 * args.seconds
        results = await asyncio.gather(*(one_stream(stub, config, timeout) for _ in range(streams)))
    after = probe.snapshot()
    return LevelReport(streams, list(results), before, after)


def _no_http(root: Path) -> list[str]:
    """The flags that turn HTTP off in the checkout at `root`: --no-http since the options were
    declared in one place, --http-port 0 before that, none before HTTP existed."""
    if (root / "miotts_stream/service/options.py").is_file():
        return ["--no-http"]
    if (root / "miotts_stream/service/http").is_dir():
        return ["--http-port", "0"]
    return []


def start_processes(
    args, max_streams: int, root: Path = ROOT
) -> tuple[list[subprocess.Popen], str, ServerProbe]:
    processes = []
    port, metrics_port = free_port(), free_port()
    codec = str(TINY_CODECS.get(args.codec, args.codec))
    command = [
        sys.executable,
        str(root / "server.py"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        *_no_http(root),
        "--max-streams",
        str(max_streams),
        *(["--codec", codec] if codec != "random-24khz" else []),  # the default either way
        "--log-level",
        "WARNING",
        *args.server_arg,
    ]
    if args.device:
        command += ["--device", args.device]
    if args.source == "inprocess":
        command += [
            "--llm-standin-rate",
            str(args.rate),
            "--llm-standin-prefill-ms",
            str(args.prefill_ms),
        ]
    else:
        llm_port = free_port()
        standin = [
            sys.executable,
            "-m",
            "miotts_stream.llm.standin_server",
            "--port",
            str(llm_port),
            "--rate",
            str(args.rate),
            "--prefill-ms",
            str(args.prefill_ms),
        ]
        processes.append(subprocess.Popen(standin, cwd=ROOT))
        command += ["--llm-base-url", f"http://127.0.0.1:{llm_port}/v1"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    processes.append(subprocess.Popen(command, cwd=root, env=env))
    probe = ServerProbe(processes[-1].pid, f"http://127.0.0.1:{metrics_port}/metrics")
    return processes, f"127.0.0.1:{port}", probe


async def find_max(address: str, probe: ServerProbe, args, buffer_s: float, limit: int) -> list:
    """Doubling, then bisection, on 'no underrun behind the buffer and no error'."""
    rows, good, bad = [], 0, None
    streams = max(1, args.find_max_start)
    while True:
        report = await run_level(address, probe, streams, args, args.first_audio[0])
        rows.append(report.row(buffer_s))
        passed = report.underruns(buffer_s) == 0 and len(report.ok) == streams
        if passed:
            good = streams
        else:
            bad = streams
        if bad is None:
            if streams >= limit:
                break
            streams = min(limit, streams * 2)
        else:
            if bad - good <= max(1, good // 8):
                break
            streams = (good + bad) // 2
    return rows, good


async def main_async(args) -> None:
    if args.baseline:
        baseline = Path(args.baseline).resolve()
        rows = await run_levels(args, baseline) + await run_levels(args, ROOT)
        headers = ["server", *(h.format(buffer=f"{args.buffer_ms:g}") for h in HEADERS)]
        print(f"\n{title(args)}\n{table(headers, rows)}")
        return
    await run_levels(args, ROOT)


def title(args) -> str:
    return (
        f"load: codec {args.codec} on {args.device or 'the default device'}, stand-in LLM "
        f"{args.rate:g} codes/s per stream ({args.source}), {args.encoding} "
        f"{args.sample_rate or 'codec rate'}, up to {args.seconds:g} s per stream, "
        f"{os.cpu_count()} CPUs"
    )


async def run_levels(args, root: Path) -> list[list]:
    """Starts the server of checkout `root`, runs the levels (and --find-max), prints the
    tables; returns the levels' rows, labelled with the checkout."""
    levels = sorted(args.levels)
    limit = args.find_max_limit if args.find_max else 0
    processes, address, probe = start_processes(args, max([*levels, limit]) + 8, root)
    buffer_s = args.buffer_ms / 1000
    headers = [h.format(buffer=f"{args.buffer_ms:g}") for h in HEADERS]
    label = "this checkout" if root == ROOT else f"baseline {root.name}"
    rows, labels = [], []
    try:
        await wait_serving(address, timeout=args.startup_timeout)
        warm = argparse.Namespace(**{**vars(args), "seconds": 2.0})
        await run_level(address, probe, 2, warm)
        if levels:
            for streams in levels:
                for first_audio in args.first_audio:
                    report = await run_level(address, probe, streams, args, first_audio)
                    rows.append(report.row(buffer_s))
                    labels.append(
                        label if len(args.first_audio) == 1 else f"{label}, {first_audio}"
                    )
                    print(table(headers, rows[-1:]), flush=True)
            print(f"\n{label}: {title(args)}\n{table(headers, rows)}", flush=True)
        if args.find_max:
            search, best = await find_max(address, probe, args, buffer_s, limit)
            print(f"\nfind-max, {label}: {title(args)}\n{table(headers, search)}")
            print(f"most streams with no underrun behind {args.buffer_ms:g} ms: {best}")
    finally:
        for process in reversed(processes):
            stop_process(process)
    return [[row_label, *row] for row_label, row in zip(labels, rows, strict=True)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=int, nargs="*", default=[1, 16, 64])
    parser.add_argument("--rate", type=float, default=50.0, help="codes/s per stream")
    parser.add_argument("--prefill-ms", type=float, default=15.0)
    parser.add_argument(
        "--codec",
        default="tiny-24khz",
        help="tiny-24khz, tiny-44khz (test fixtures), random-24khz, random-44khz (full size), "
        "or a checkpoint folder",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: the server's)")
    parser.add_argument("--source", choices=("inprocess", "openai"), default="inprocess")
    parser.add_argument("--encoding", default="PCM_S16LE")
    parser.add_argument("--sample-rate", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--buffer-ms", type=float, default=150.0)
    parser.add_argument(
        "--first-audio",
        nargs="+",
        choices=("balanced", "earliest"),
        default=["balanced"],
        help="streaming.first_audio of the streams; several: each level once with each, in "
        "one run (default balanced)",
    )
    parser.add_argument("--find-max", action="store_true")
    parser.add_argument("--find-max-start", type=int, default=4)
    parser.add_argument("--find-max-limit", type=int, default=512)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument(
        "--baseline", default=None, help="another checkout to measure first, for comparison"
    )
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra server.py argument (repeat)"
    )
    return parser


def main() -> None:
    asyncio.run(main_async(build_parser().parse_args()))


if __name__ == "__main__":
    main()
