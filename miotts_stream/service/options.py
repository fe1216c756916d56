"""The server's options, declared once and grouped by concern.

Each group is a dataclass for one concern (where it listens, the speech LLM, the in-process
engine, the decoder, voices, stream limits, HTTP connections, access); each field is declared
with `option(default, help)`. Everything else is derived from these declarations:

- `server.py`'s command line (`argument_parser`): one flag per field, `--field-name` unless
  declared otherwise, its type from the annotation, `(default ...)` added to its help, the
  groups as `--help` sections;
- the README's flag tables (`flag_table`, between `<!-- flags: GROUP -->` markers; running
  `python -m miotts_stream.service.options README.md` rewrites them, and tests/test_options.py
  fails when they differ);
- `ServerOptions.with_values(max_streams=4, ...)`: options by their flat names, as the command
  line spells them (the tests' servers are configured this way).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import ssl
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import grpc

from miotts_stream.audio.reference import MAX_INPUT_BYTES
from miotts_stream.demo_model import ARCHITECTURES, DEFAULT_ARCH
from miotts_stream.llm.vllm_source import parse_engine_arg
from miotts_stream.voices.aliases import parse_voice_alias

from .engine import SessionLimits

# The process's exit status when --exit-on-engine-death ends it (for an orchestrator).
ENGINE_DEATH_EXIT_CODE = 3
CODEC_DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Flag:
    """How an option appears on the command line and in the docs."""

    help: str
    name: str | None = None  # default: --field-name
    metavar: str | None = None  # default: N for integers, S for seconds, else VALUE
    choices: tuple[str, ...] | None = None
    default_text: str | None = None  # what the default means, where the value does not say
    off: str | None = None  # a second flag that sets the option to None (--no-metrics)
    parse: Callable[[str], Any] | None = None  # each value given (repeated flags: each one)


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    secret: bool = False,
    **flag: Any,
) -> Any:
    """A dataclass field that is also a command-line flag. `secret`: kept out of repr (keys,
    URIs with passwords), so that a logged option dump never shows it."""
    metadata = {"flag": Flag(help, **flag)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata, repr=not secret)
    return field(default=default, metadata=metadata, repr=not secret)


# ---- the groups ---------------------------------------------------------------------------


@dataclass
class NetworkOptions:
    TITLE: ClassVar[str] = "where it listens"

    host: str = option("0.0.0.0", "address to listen on, for every port", metavar="HOST")
    port: int = option(50051, "gRPC port (0: any free port)")
    http_port: int | None = option(
        8080,
        "HTTP port: OpenAI /v1/audio/speech, the /v1/stream WebSocket and the demo page at /, "
        "with gRPC's engine, keys and limits (0: any free port)",
        off="--no-http",
    )
    metrics_port: int | None = option(
        9400, "Prometheus /metrics port (0: any free port)", off="--no-metrics"
    )


@dataclass
class LLMOptions:
    TITLE: ClassVar[str] = "speech LLM"

    model: str | None = option(
        None,
        "speech LLM for the in-process vLLM engine: a folder or a Hugging Face id",
        default_text="the built-in small demo model, random weights",
        metavar="MODEL",
    )
    llm_base_url: tuple[str, ...] = option(
        (),
        "use an OpenAI-compatible server (vllm serve, llama.cpp, Ollama) instead of the "
        "in-process engine, e.g. http://127.0.0.1:8000/v1; repeat it for several servers: "
        "each request goes to the one with the fewest in flight, and one that fails is taken "
        "out and probed back in",
        metavar="URL",
    )
    llm_model: str | None = option(
        None, "model name on that server", default_text="the first of /v1/models", metavar="NAME"
    )
    llm_api_key: str | None = option(
        None, "bearer token for that server", secret=True, metavar="KEY"
    )
    llm_standin_rate: float | None = option(
        None,
        "load tests: instead of an LLM, a stand-in that writes random speech codes at this "
        "many per second per request (noise of the right length, not speech)",
        default_text="off",
        metavar="RATE",
    )
    llm_standin_prefill_ms: float = option(
        15.0, "the stand-in's delay before its first code", metavar="MS"
    )


@dataclass
class VLLMOptions:
    TITLE: ClassVar[str] = "in-process vLLM engine"

    max_model_len: int = option(2048, "prompt + speech tokens per request")
    dtype: str = option("auto", "model dtype", metavar="DTYPE")
    gpu_memory_utilization: float = option(
        0.5, "GPU memory share for vLLM (weights + KV cache), CUDA only", metavar="SHARE"
    )
    kv_cache_gib: float | None = option(
        None,
        "KV cache size in GiB",
        default_text="1 on CPU; on a GPU, sized from --gpu-memory-utilization",
        metavar="GIB",
    )
    enforce_eager: bool = option(
        False, "disable CUDA graphs / compilation (faster start, slower decode)"
    )
    engine_args: Mapping[str, Any] = option(
        help="any vLLM engine argument, over this program's choices; VALUE is JSON when it "
        "parses (8, 0.5, true, {...}), else a string; may be repeated, e.g. --engine-arg "
        "enable_prefix_caching=false --engine-arg max_num_seqs=32",
        factory=dict,
        name="--engine-arg",
        metavar="KEY=VALUE",
        parse=parse_engine_arg,
    )
    demo_arch: str = option(
        DEFAULT_ARCH,
        "architecture of the built-in demo model served without --model",
        choices=tuple(sorted(ARCHITECTURES)),
        metavar="ARCH",
    )
    cpu_placement: str = option(
        "auto",
        "when the in-process engine and the codec both run on the CPU: auto splits the cores "
        "between the LLM worker and the decoder",
        choices=("auto", "off"),
        metavar="MODE",
    )
    exit_on_engine_death: bool = option(
        False,
        f"when the engine core dies, exit with status {ENGINE_DEATH_EXIT_CODE} (for an "
        "orchestrator to restart) instead of restarting the engine in process",
    )


@dataclass
class DecoderOptions:
    TITLE: ClassVar[str] = "codec"

    codec: str | None = option(
        None,
        "MioCodec checkpoint: a folder (config.yaml + model.safetensors) or a Hugging Face id; "
        "random-24khz / random-44khz: the released architecture with random weights",
        default_text="random-24khz",
        metavar="CODEC",
    )
    device: str | None = option(
        None,
        "cuda or cpu for the codec; the in-process engine runs where the installed vLLM build "
        "runs, and this is checked against it",
        default_text="cuda if available",
        metavar="DEVICE",
    )
    codec_dtype: str = option(
        "auto",
        "codec compute precision of its transformers (the rest stays float32): auto is "
        "bfloat16 on CUDA (as upstream) and on CPUs with AVX-512 BF16 or AMX, float32 on other "
        "CPUs; float32 on CUDA uses TF32 matrix units",
        choices=CODEC_DTYPE_NAMES,
        metavar="DTYPE",
    )
    max_batch: int = option(32, "decode windows per batched step, all streams")


@dataclass
class VoiceOptions:
    TITLE: ClassVar[str] = "voices and cloning"

    presets_dirs: tuple[str, ...] = option(
        (),
        "extra folder of voice embeddings (.pt/.npy/.safetensors), by file name; may be repeated",
        name="--presets-dir",
        metavar="DIR",
    )
    default_voice: str = option(
        "en_female", "preset used when a request names no voice", metavar="NAME"
    )
    voice_aliases: Mapping[str, str] = option(
        help="another name for a voice: a request naming NAME gets VOICE (a preset or a stored "
        "voice id); may be repeated. OpenAI's 13 voice names (alloy, ash, ..., verse) are "
        "aliases of the English presets already (README: Voice aliases); this can point them "
        "elsewhere",
        factory=dict,
        name="--voice-alias",
        metavar="NAME=VOICE",
        parse=parse_voice_alias,
    )
    data_dir: str = option(
        ".data",
        "folder of the voice store, shared with python -m miotts_stream.voices",
        metavar="DIR",
    )
    voice_store: str | None = option(
        None,
        "where stored voices live: postgresql://USER:PASSWORD@HOST:PORT/DB for a database "
        "shared by replicas, or sqlite:///PATH/FILE",
        default_text="SQLite in --data-dir",
        secret=True,  # a URI may hold a password
        metavar="URI",
    )
    ssl_model: str | None = option(
        None,
        "WavLM for cloning voices from audio: a transformers folder, a Hugging Face id, or "
        "'random'",
        default_text="microsoft/wavlm-base-plus with --codec; the built-in random-weight WavLM "
        "without",
        metavar="MODEL",
    )
    reference_min_seconds: float = option(1.0, "shortest reference audio accepted")
    reference_max_seconds: float = option(
        30.0,
        "longest reference audio accepted; also what bounds a clone's memory, whatever length "
        "a file declares",
    )


@dataclass
class LimitOptions:
    TITLE: ClassVar[str] = "limits and timeouts of streams (seconds; 0 disables one)"

    max_streams: int = option(
        16, "synthesis streams open at once, all clients and transports; more are refused"
    )
    max_text_chars: int = option(10000, "text characters per stream")
    max_receive_message_bytes: int = option(
        MAX_INPUT_BYTES + 64 * 1024,
        "largest gRPC message, HTTP request body or WebSocket frame: room for 16 MiB of "
        "reference audio and the rest of a message",
    )
    idle_timeout_s: float = option(
        20.0,
        "close a stream that sends nothing for this long while nothing is pending (all its "
        "audio sent, or only a config)",
    )
    max_stream_s: float = option(600.0, "longest a stream may stay open, generation included")
    conversation_idle_timeout_s: float = option(
        300.0,
        "close a conversation (/v1/conversation, Converse) that has no utterance open and sends "
        "nothing for this long; each utterance has the stream limits",
    )
    stall_timeout_s: float = option(
        30.0, "cancel a stream whose client has read nothing for this long"
    )
    drain_timeout_s: float = option(
        30.0, "on SIGTERM/SIGINT, how long open streams may take to finish"
    )
    drain_notice_s: float = option(
        0.0,
        "on SIGTERM/SIGINT, health turns NOT_SERVING at once but new streams are still taken "
        "for this long, so that a load balancer takes the replica out before it refuses any "
        "(docs/deploy.md)",
    )
    keepalive_time_s: float = option(
        30.0, "HTTP/2 and WebSocket ping interval, to find peers that vanished"
    )
    keepalive_timeout_s: float = option(
        10.0, "drop a peer that does not answer a ping within this long"
    )

    def session_limits(self) -> SessionLimits:
        return SessionLimits(
            idle_s=self.idle_timeout_s, max_stream_s=self.max_stream_s, stall_s=self.stall_timeout_s
        )

    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel arguments of the gRPC server: message size and keepalive pings."""
        options = [
            ("grpc.max_receive_message_length", self.max_receive_message_bytes),
            # Binding a port another process holds must fail, not share it (gRPC's default
            # SO_REUSEPORT would let two servers split one port's connections between them).
            ("grpc.so_reuseport", 0),
        ]
        if self.keepalive_time_s > 0:
            options += [
                # Ping idle connections, so that a peer that vanished (no FIN, no RST) is found
                # and its streams end, instead of holding slots until TCP gives up hours later.
                ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
                ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                # Clients may ping too, but not more often than every 10 s.
                ("grpc.http2.min_ping_interval_without_data_ms", 10000),
                ("grpc.http2.max_ping_strikes", 2),
            ]
        return options


@dataclass
class HttpConnectionOptions:
    TITLE: ClassVar[str] = "HTTP connections (seconds; 0 disables one)"

    http_head_timeout_s: float = option(
        10.0,
        "a request's line and headers must arrive in full within this long of their first "
        "byte (of connecting, for a connection's first request); a client that sends nothing, "
        "or its headers a byte at a time, is disconnected",
    )
    http_body_timeout_s: float = option(
        60.0,
        "a request body must arrive in full within this long of its headers (16 MiB of "
        "reference audio in 60 s is 2.2 Mbit/s); a body that stalls or trickles is cut off",
    )
    http_keepalive_timeout_s: float = option(
        30.0,
        "close a kept-alive connection that starts no new request for this long after its "
        "last response",
    )
    http_max_connections: int = option(
        512,
        "HTTP and WebSocket connections open at once; one more is answered 503 and closed, so "
        "a flood of idle sockets cannot take every file descriptor",
    )


@dataclass
class AccessOptions:
    TITLE: ClassVar[str] = "access"

    tls_cert: str | None = option(
        None,
        "PEM certificate chain: serve TLS on the gRPC port and HTTPS on --http-port",
        default_text="off",
        metavar="FILE",
    )
    tls_key: str | None = option(
        None, "PEM private key of --tls-cert", default_text="off", metavar="FILE"
    )
    tls_client_ca: str | None = option(
        None,
        "PEM CA certificates: require client certificates they signed, on both ports (mTLS)",
        default_text="off",
        metavar="FILE",
    )
    api_keys: tuple[str, ...] = option(
        (),
        "accept this key, 8 characters or more (clients send 'authorization: Bearer KEY'); "
        "may be repeated",
        secret=True,
        name="--api-key",
        metavar="KEY",
    )
    api_keys_file: str | None = option(
        None,
        "file of keys, one per line: KEY [name=NAME] [max_streams=N], each KEY 8 characters or "
        "more; # comments; read again on SIGHUP",
        metavar="FILE",
    )
    api_keys_db: str | None = option(
        None,
        "postgresql://... : keys shared by replicas (manage them with python -m "
        "miotts_stream.service.key_store); read again every --api-keys-refresh-s and on SIGHUP",
        secret=True,
        metavar="URI",
    )
    api_keys_refresh_s: float = option(
        30.0, "how often keys from --api-keys-db are read again (0: only on SIGHUP)"
    )

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS (and mTLS with --tls-client-ca) credentials, or None for plaintext."""
        if not (self.tls_cert or self.tls_key):
            if self.tls_client_ca:
                raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
            return None
        if not (self.tls_cert and self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        chain = Path(self.tls_cert).read_bytes()
        key = Path(self.tls_key).read_bytes()
        client_ca = Path(self.tls_client_ca).read_bytes() if self.tls_client_ca else None
        return grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )

    def http_ssl_context(self) -> ssl.SSLContext | None:
        """HTTPS for the HTTP port with gRPC's certificate and key (and --tls-client-ca: client
        certificates required), so that keys never cross in plaintext on one port and not the
        other; None for plaintext."""
        if not (self.tls_cert and self.tls_key):
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls_cert, self.tls_key)
        if self.tls_client_ca:
            context.load_verify_locations(self.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


# ---- all of them ----------------------------------------------------------------------------


@dataclass
class ServerOptions:
    """Everything `server.py` takes, by concern. `ServerOptions()` is what the command line
    gives with no flags."""

    network: NetworkOptions = field(default_factory=NetworkOptions)
    llm: LLMOptions = field(default_factory=LLMOptions)
    vllm: VLLMOptions = field(default_factory=VLLMOptions)
    decoder: DecoderOptions = field(default_factory=DecoderOptions)
    voices: VoiceOptions = field(default_factory=VoiceOptions)
    limits: LimitOptions = field(default_factory=LimitOptions)
    http: HttpConnectionOptions = field(default_factory=HttpConnectionOptions)
    access: AccessOptions = field(default_factory=AccessOptions)

    def with_values(self, **values: Any) -> ServerOptions:
        """A copy with options replaced by their flat names (`max_streams=4`, `api_keys=[...]`,
        as the flags spell them), each in its group."""
        groups = {}
        for group in dataclasses.fields(self):
            current = getattr(self, group.name)
            mine = {
                f.name: values.pop(f.name) for f in option_fields(type(current)) if f.name in values
            }
            groups[group.name] = dataclasses.replace(current, **mine)
        if values:
            raise TypeError(f"unknown server options: {', '.join(sorted(values))}")
        return ServerOptions(**groups)


def option_groups() -> list[tuple[str, type]]:
    """(attribute name, group class) of every group of `ServerOptions`, in declaration order."""
    hints = typing.get_type_hints(ServerOptions)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(ServerOptions)]


def option_fields(group: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(group) if "flag" in f.metadata]


def group_named(name: str) -> type:
    return dict(option_groups())[name]


# ---- the command line -----------------------------------------------------------------------


def _value_type(annotation: Any) -> Any:
    """int for `int`, `int | None`, `tuple[int, ...]`...: what one value on the command line
    is."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return _value_type(args[0])
    if _repeated(annotation):
        return str
    return annotation


def _repeated(annotation: Any) -> bool:
    """A flag given once per value: a tuple of them, or KEY=VALUE pairs."""
    return typing.get_origin(annotation) in (tuple, Mapping)


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata["flag"].name or "--" + f.name.replace("_", "-")


def _metavar(f: dataclasses.Field, kind: Any) -> str:
    declared = f.metadata["flag"].metavar
    if declared:
        return declared
    if kind is int:
        return "N"
    if kind is float and f.name.endswith(("_s", "_seconds")):
        return "S"
    return "VALUE"


def default_text(f: dataclasses.Field) -> str:
    """The default as the help and the docs show it."""
    flag: Flag = f.metadata["flag"]
    if flag.default_text is not None:
        return flag.default_text
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if default is None or default == () or default == {}:
        return "none"
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


def argument_parser(description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for _, group in option_groups():
        section = parser.add_argument_group(group.TITLE)
        hints = typing.get_type_hints(group)
        for f in option_fields(group):
            flag: Flag = f.metadata["flag"]
            annotation = hints[f.name]
            kind = _value_type(annotation)
            if kind is bool:
                section.add_argument(flag_name(f), action="store_true", dest=f.name, help=flag.help)
                continue
            repeated = _repeated(annotation)
            section.add_argument(
                flag_name(f),
                dest=f.name,
                type=flag.parse or kind,
                action="append" if repeated else "store",
                default=None if repeated else f.default,
                choices=flag.choices,
                metavar=_metavar(f, kind),
                help=f"{flag.help} (default: {default_text(f)})",
            )
            if flag.off:
                section.add_argument(
                    flag.off,
                    dest=f.name,
                    action="store_const",
                    const=None,
                    help=f"turn {flag_name(f)} off",
                )
    return parser


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    """ServerOptions from a parsed command line (other attributes of `args` are left alone)."""
    hints = {name: typing.get_type_hints(group) for name, group in option_groups()}
    values = {}
    for name, group in option_groups():
        for f in option_fields(group):
            value = getattr(args, f.name)
            origin = typing.get_origin(hints[name][f.name])
            if origin is tuple:
                value = tuple(value or ())
            elif origin is Mapping:
                value = dict(value or ())
            values[f.name] = value
    return ServerOptions().with_values(**values)


# ---- the docs -------------------------------------------------------------------------------


def flag_table(group: type) -> str:
    """A Markdown table of a group's flags: flag, default, what."""
    hints = typing.get_type_hints(group)
    rows = ["| flag | default | what |", "|---|---|---|"]
    for f in option_fields(group):
        flag: Flag = f.metadata["flag"]
        kind = _value_type(hints[f.name])
        spelled = flag_name(f) if kind is bool else f"{flag_name(f)} {_metavar(f, kind)}"
        if flag.off:
            spelled += f"`, `{flag.off}"
        what = flag.help.replace("|", "\\|")
        rows.append(f"| `{spelled}` | {default_text(f)} | {what} |")
    return "\n".join(rows)


TABLE_BLOCK = re.compile(r"(<!-- flags: (\w+) -->\n)(.*?)(<!-- end flags -->)", re.DOTALL)


def with_flag_tables(markdown: str) -> str:
    """`markdown` with every `<!-- flags: GROUP -->` ... `<!-- end flags -->` block holding
    that group's table as declared now."""
    return TABLE_BLOCK.sub(
        lambda m: m.group(1) + flag_table(group_named(m.group(2))) + "\n" + m.group(4), markdown
    )


def main(argv: list[str] | None = None) -> None:
    """Rewrite the flag tables of the Markdown files named on the command line."""
    for name in argv if argv is not None else sys.argv[1:]:
        path = Path(name)
        path.write_text(with_flag_tables(path.read_text()))


if __name__ == "__main__":
    main()
