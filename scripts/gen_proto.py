"""Generate the Python gRPC code for proto/ into miotts_stream/service/pb/.

    python scripts/gen_proto.py [--check]

protoc emits absolute imports (`from miotts.v1 import tts_pb2`); we rewrite them to the
package path so the generated modules import without touching sys.path. Generation always runs
in a fresh folder; only its `.py` and `.pyi` files are copied over (never the `__pycache__`
beside them). `--check` fails if the committed files differ from a fresh generation (a test runs
it). The code depends on the grpcio-tools version (it names it), so run this with the locked one
(`.venv/bin/python scripts/gen_proto.py`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "miotts_stream" / "service" / "pb"
PACKAGE = "miotts_stream.service.pb"


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *protos,
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed ({code})")
    for path in _sources(out):
        text = path.read_text()
        path.write_text(text.replace("from miotts.v1 import", f"from {PACKAGE}.miotts.v1 import"))
    for folder in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()


def _sources(folder: Path) -> list[Path]:
    """The generated .py and .pyi files (not the bytecode Python caches beside them)."""
    return [p for p in folder.rglob("*") if p.suffix in (".py", ".pyi")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = {p.relative_to(tmp): p.read_text() for p in _sources(Path(tmp))}
    committed = {p.relative_to(OUT): p.read_text() for p in _sources(OUT)}
    if args.check:
        if fresh != committed:
            sys.exit("generated gRPC code is stale: run python scripts/gen_proto.py")
        return
    for stale in committed.keys() - fresh.keys():
        (OUT / stale).unlink()
    for relative, text in fresh.items():
        (OUT / relative).parent.mkdir(parents=True, exist_ok=True)
        (OUT / relative).write_text(text)


if __name__ == "__main__":
    main()
