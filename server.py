"""miotts-stream server: streaming MioTTS over gRPC (miotts.v1.TextToSpeech) and HTTP
(OpenAI /v1/audio/speech, the /v1/stream WebSocket, a demo page at /).

With no flags it serves the built-in default, a small demo speech LLM and a full-size 24 kHz
MioCodec decoder, both with RANDOM WEIGHTS (audio of the right shape and timing, not speech).
Real models, on a GPU machine:

    python server.py --model Aratako/MioTTS-0.1B --codec Aratako/MioCodec-25Hz-24kHz
"""

from __future__ import annotations

import asyncio
import logging

from miotts_stream.service.options import argument_parser, options_from_args
from miotts_stream.service.server import ServerOptions, run_server


def parse_args(argv: list[str] | None = None) -> ServerOptions:
    """The options of the command line (declared in miotts_stream/service/options.py); sets up
    logging at --log-level."""
    parser = argument_parser(__doc__)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return options_from_args(args)


def main() -> None:
    asyncio.run(run_server(parse_args()))


if __name__ == "__main__":
    main()
