"""Speech tokens from an LLM: one interface, an async stream of MioCodec codes per request.

Sources: `VLLMTokenSource` (vLLM's engine in this process: token ids, sampling restricted to
speech tokens), `OpenAITokenSource` (a server the user runs: `vllm serve`, llama.cpp, Ollama)
and `LLMRouter` (several such servers: least in flight, failover, health probes).
"""

from miotts_stream.speech_codes import NUM_SPEECH_CODES, TOKEN_RATE_HZ

from .base import (
    EmptyTextError,
    EngineState,
    LLMError,
    LLMRequestError,
    LLMUnavailableError,
    RunawayGuard,
    SamplingOptions,
    TokenSource,
    TokenStream,
    chat_messages,
    token_budget,
)
from .openai_source import OpenAITokenSource, OpenAITokenStream
from .router import LLMRouter, LLMServer
from .speech_tokens import SpeechTextParser, SpeechVocabulary
from .vllm_source import (
    ModelConfigError,
    RestartPolicy,
    VLLMEngineOptions,
    VLLMTokenSource,
    VLLMTokenStream,
    build_engine,
    parse_engine_arg,
)

__all__ = [
    "NUM_SPEECH_CODES",
    "TOKEN_RATE_HZ",
    "EmptyTextError",
    "EngineState",
    "LLMError",
    "LLMRequestError",
    "LLMRouter",
    "LLMServer",
    "LLMUnavailableError",
    "ModelConfigError",
    "OpenAITokenSource",
    "OpenAITokenStream",
    "RestartPolicy",
    "RunawayGuard",
    "SamplingOptions",
    "SpeechTextParser",
    "SpeechVocabulary",
    "TokenSource",
    "TokenStream",
    "VLLMEngineOptions",
    "VLLMTokenSource",
    "VLLMTokenStream",
    "build_engine",
    "chat_messages",
    "parse_engine_arg",
    "token_budget",
]
