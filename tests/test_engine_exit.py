"""server.py --exit-on-engine-death: the process ends, non-zero, when vLLM's engine core dies
(a real server process on loopback, the tiny demo model, the engine core killed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from miotts_stream.demo_model import ensure_demo_model
from miotts_stream.service.server import ENGINE_DEATH_EXIT_CODE

from .conftest import TINY_CODECS
from .test_family import engine_core

ROOT = Path(__file__).resolve().parents[1]


def test_exit_on_engine_death(tmp_path: Path) -> None:
    """With --exit-on-engine-death the process ends, non-zero, when the engine core dies."""
    model = ensure_demo_model("tiny")
    log = tmp_path / "server.log"
    command = [
        sys.executable,
        "server.py",
        "--model",
        str(model),
        "--codec",
        str(TINY_CODECS["24khz"]),
        "--device",
        "cpu",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--no-metrics",
        "--no-http",
        "--max-model-len",
        "512",
        "--kv-cache-gib",
        "0.25",
        "--exit-on-engine-death",
    ]
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        # Up when it logs that it serves (bounded: an engine start here takes under a minute).
        for _ in range(600):
            if "serving miotts.v1.TextToSpeech" in log.read_text() or process.poll() is not None:
                break
            time.sleep(0.5)
        assert process.poll() is None, log.read_text()[-3000:]
        core = engine_core(psutil.Process(process.pid))
        os.kill(core.pid, signal.SIGKILL)
        assert process.wait(timeout=120) == ENGINE_DEATH_EXIT_CODE
        assert "exiting (--exit-on-engine-death)" in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
