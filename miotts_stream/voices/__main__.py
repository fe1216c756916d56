"""Manage stored voices on the store the server uses.

    python -m miotts_stream.voices create --audio x.wav --id my_voice [--name "My voice"]
    python -m miotts_stream.voices list
    python -m miotts_stream.voices delete --id my_voice
    python -m miotts_stream.voices export --id my_voice --out my_voice.pt   (or .safetensors)
    python -m miotts_stream.voices import --id my_voice --file my_voice.pt

Give `create` the same --codec and --ssl-model as the server (by default both use the built-in
random-weight models), so that the embedding fits the codec that will speak with it.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from miotts_stream.audio.reference import AudioLimits
from miotts_stream.codec.voices import VoiceLibrary, load_voice_file

from .registry import check_new_voice_id, embed_reference_audio, make_encoder
from .store import (
    DEFAULT_DATA_DIR,
    VoiceExists,
    VoiceNotFound,
    VoiceRecord,
    VoiceSource,
    VoiceStore,
    VoiceStoreUnavailable,
    check_voice_id,
    export_embedding,
    open_voice_store,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m miotts_stream.voices",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data-dir",
        default=str(DEFAULT_DATA_DIR),
        help=f"the server's --data-dir (default {DEFAULT_DATA_DIR}/)",
    )
    parser.add_argument(
        "--voice-store",
        default=None,
        help="the server's --voice-store (postgresql://... or sqlite:///PATH; default: SQLite "
        "in --data-dir)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="clone a voice from reference audio")
    create.add_argument("--audio", required=True, type=Path, help="WAV, FLAC, Ogg/Opus or MP3")
    create.add_argument("--id", required=True, dest="voice_id", help="[a-z0-9_-]{1,64}")
    create.add_argument("--name", default="", help="display name")
    create.add_argument("--language", default="", help="language tag, e.g. en or ja")
    create.add_argument(
        "--codec", default=None, help="the server's --codec (default: random-24khz, built in)"
    )
    create.add_argument("--ssl-model", default=None, help="the server's --ssl-model")
    create.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    create.add_argument("--min-seconds", type=float, default=AudioLimits.min_seconds)
    create.add_argument("--max-seconds", type=float, default=AudioLimits.max_seconds)
    commands.add_parser("list", help="list stored voices")
    delete = commands.add_parser("delete", help="delete a stored voice")
    delete.add_argument("--id", required=True, dest="voice_id")
    export = commands.add_parser("export", help="write a voice as an upstream preset file")
    export.add_argument("--id", required=True, dest="voice_id")
    export.add_argument("--out", required=True, type=Path, help="FILE.pt or FILE.safetensors")
    imp = commands.add_parser("import", help="store an embedding file (.pt/.npy/.safetensors)")
    imp.add_argument("--id", required=True, dest="voice_id")
    imp.add_argument("--file", required=True, type=Path)
    imp.add_argument("--name", default="")
    imp.add_argument("--language", default="")
    return parser


def _describe(record: VoiceRecord) -> str:
    created = datetime.fromtimestamp(record.created_at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    seconds = f"{record.duration_seconds:.1f} s" if record.duration_seconds else "-"
    return "\t".join(
        (record.voice_id, record.display_name or "-", record.language or "-", seconds, created)
    )


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    store = open_voice_store(args.voice_store, args.data_dir)
    try:
        return _run(args, store)
    finally:
        store.close()


def _run(args: argparse.Namespace, store: VoiceStore) -> int:
    if args.command == "create":
        check_new_voice_id(args.voice_id, VoiceLibrary(), store)  # before loading the encoder
        encoder = make_encoder(args.codec, args.ssl_model, args.device)
        limits = AudioLimits(args.min_seconds, args.max_seconds)
        embedding, seconds = embed_reference_audio(encoder, args.audio, limits)
        record = store.create(
            VoiceRecord(
                voice_id=args.voice_id,
                embedding=embedding,
                display_name=args.name,
                language=args.language,
                duration_seconds=seconds,
                source=VoiceSource.AUDIO,
                encoder=encoder.source,
            )
        )
        print(f"created {_describe(record)}")
    elif args.command == "list":
        for record in store.list():
            print(_describe(record))
    elif args.command == "delete":
        store.delete(check_voice_id(args.voice_id))
        print(f"deleted {args.voice_id}")
    elif args.command == "export":
        record = store.get(check_voice_id(args.voice_id))
        print(f"wrote {export_embedding(record.embedding, args.out)}")
    elif args.command == "import":
        check_new_voice_id(args.voice_id, VoiceLibrary(), store)
        record = store.create(
            VoiceRecord(
                voice_id=args.voice_id,
                embedding=load_voice_file(args.file),
                display_name=args.name,
                language=args.language,
                source=VoiceSource.IMPORTED,
                encoder=f"imported from {args.file.name}",
            )
        )
        print(f"imported {_describe(record)}")
    return 0


def main() -> None:
    try:
        sys.exit(run())
    except (ValueError, VoiceExists, VoiceNotFound, VoiceStoreUnavailable, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
