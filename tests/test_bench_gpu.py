"""`bench.gpu`, the one script a lent GPU runs, checked on the CPU before any GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_section_runs_and_is_written(tmp_path):
    out = tmp_path / "gpu.json"
    command = ["-m", "miotts_stream.bench.gpu", "--device", "cpu", "--quick", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    names = [section["name"] for section in report["sections"]]
    assert [name.split(",")[0] for name in names] == [
        "decode step",
        "first chunk",
        "streaming LSD against the fp32 offline decode",
        "bench.load",
    ]
    steps, first, lsd, load = (section["rows"] for section in report["sections"])
    assert {(r["window"], r["batch"]) for r in steps} == {
        (window, batch) for window in ("steady 50+20+32", "long 50+80+128") for batch in (1, 2)
    }
    assert all(r["step_ms"] > 0 for r in steps) and all(r["first_chunk_ms"] > 0 for r in first)
    assert all(0 < r["lsd_fp32"] < 20 and 0 < r["lsd_bf16"] < 20 for r in lsd)
    assert [r["streams"] for r in load] == [2] and load[0]["errors"] == 0
