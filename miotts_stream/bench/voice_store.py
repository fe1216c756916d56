"""The voice store's cost per stream: how long reading one stored voice takes.

    python -m miotts_stream.bench.voice_store --voice-store postgresql://USER@HOST/DB [--calls 2000]
    python -m miotts_stream.bench.voice_store --voice-store sqlite:///tmp/voices.sqlite3

A stream that names a stored voice reads it once, by id, when it starts; there is no cache in
front of the store (see miotts_stream/voices/postgres.py for why). This prints that read's mean
and 99th-percentile time on the given store, so the figure can be set against first-audio
times. It creates a voice `bench-voice-store` and deletes it at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch

from miotts_stream.voices import VoiceExists, VoiceRecord, open_voice_store

VOICE_ID = "bench-voice-store"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voice-store", required=True, help="as the server's --voice-store")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    store = open_voice_store(args.voice_store)
    try:
        with contextlib.suppress(VoiceExists):  # left by a run that was interrupted
            store.create(VoiceRecord(VOICE_ID, torch.randn(128)))
        for _ in range(50):  # connections made, caches warm
            store.get(VOICE_ID)
        times = np.empty(args.calls)
        for i in range(args.calls):
            started = time.perf_counter()
            store.get(VOICE_ID)
            times[i] = time.perf_counter() - started
        print(f"store: {store.describe()}")
        print(
            f"get(): mean {times.mean() * 1e3:.3f} ms, p99 {np.percentile(times, 99) * 1e3:.3f} ms"
            f" over {args.calls} calls (one thread)"
        )
        store.delete(VOICE_ID)
    finally:
        store.close()


if __name__ == "__main__":
    main()
