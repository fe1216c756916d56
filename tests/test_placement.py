"""Where the LLM engine's threads and the decoder's run when both share the CPU."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from miotts_stream.service.placement import (
    CpuPlacement,
    decode_thread_initializer,
    llm_preloads,
    plan_placement,
    prepare_llm_processes,
)


def test_the_cores_are_split_when_both_run_on_the_cpu():
    assert plan_placement(True, True, [0, 1]) == CpuPlacement((0,), (1,), 1)
    assert plan_placement(True, True, [2, 3, 5]) == CpuPlacement((2, 3), (5,), 1)
    assert plan_placement(True, True, list(range(8))) == CpuPlacement((0, 1, 2, 3), (4, 5, 6, 7), 4)
    # Nothing to split: one core, the codec on a GPU, or the LLM elsewhere.
    assert plan_placement(True, True, [0]) == CpuPlacement()
    assert plan_placement(True, False, [0, 1]) == CpuPlacement()
    assert plan_placement(False, True, [0, 1]) == CpuPlacement()


def test_the_engine_processes_get_the_binding_and_the_preloads(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/lib/mine.so")
    prepare_llm_processes(CpuPlacement((0, 1), (2,), 1))
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"
    assert os.environ["LD_PRELOAD"].split(":") == [*llm_preloads(), "/lib/mine.so"]
    # This machine has both (setup.sh installs Debian's tcmalloc; the lock, intel-openmp).
    assert [os.path.basename(lib).split(".")[0] for lib in llm_preloads()] == [
        "libtcmalloc_minimal",
        "libiomp5",
    ]
    # A binding the user chose wins; preloads are not added twice.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1")
    preload = os.environ["LD_PRELOAD"]
    prepare_llm_processes(CpuPlacement((0,), (1,), 1))
    assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert os.environ["LD_PRELOAD"] == preload


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_the_decode_thread_is_pinned_and_the_others_are_not():
    main_cpus, main_threads = os.sched_getaffinity(0), torch.get_num_threads()
    decode_cpu = max(main_cpus)
    placement = CpuPlacement((min(main_cpus),), (decode_cpu,), 1)
    with ThreadPoolExecutor(1, initializer=decode_thread_initializer(placement)) as pool:
        cpus, threads = pool.submit(
            lambda: (os.sched_getaffinity(0), torch.get_num_threads())
        ).result()
    assert (cpus, threads) == ({decode_cpu}, 1)
    assert (os.sched_getaffinity(0), torch.get_num_threads()) == (main_cpus, main_threads)
