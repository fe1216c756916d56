"""Running one session to its end, the same way for every transport.

A transport (the gRPC servicer, `POST /v1/audio/speech`, the WebSocket streams) opens a session
through `Admission`, feeds it the client's text, and hands it to `run_session` with a
`SessionSink`: how that transport delivers an event and how it reports a failure. Everything
else is done here once: the session's events in order, the stop of a writer blocked on a client
that stopped reading, the outcome's status code, the client's last messages drained before an
error, the metrics (audio as it is sent, one log line per session), and the cleanup (the
session, its stream slot).

A conversation (many sessions, "contexts", on one connection) runs each of its contexts through
`run_session` in turn, with a sink that tags each event with its context.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from .access import ApiKey
from .admission import Admission, stop_blocked_writer
from .engine import AudioOut, ErrorCode, Event, SessionError, Summary, SynthesisSession

logger = logging.getLogger(__name__)

# Before a transport reports an error, its reader may read (and drop) what the client is still
# sending, for up to this long or until the client stops: a gRPC client whose queued writes land
# after the status may report another status instead (grpc/grpc#36066), and a WebSocket client
# gets its error frame rather than a reset.
ERROR_DRAIN_S = 0.25


class SessionSink(Protocol):
    """How one transport delivers a session's outcome to its client."""

    async def send(self, event: Event) -> None:
        """Deliver one event (in order; the Summary is the last)."""

    async def fail(self, error: SessionError) -> None:
        """The session ended with `error` (its events stopped before a Summary)."""


async def run_session(
    admission: Admission,
    session: SynthesisSession,
    sink: SessionSink,
    *,
    method: str,
    key: ApiKey | None,
    reader: asyncio.Task | None = None,
) -> ErrorCode:
    """Deliver the session's events through `sink` until its Summary, its cancel or its
    failure; then close the session, give its stream slot back and count the outcome.

    `reader`, when the client sends messages during the session (a bidirectional stream), is
    the task feeding them in: on an error it is given `ERROR_DRAIN_S` to drop what the client
    still sends before the sink reports the error (the transport stops it afterwards). Returns
    the outcome's code; a sink's exception (a client that went away) propagates after the
    cleanup.
    """
    code = ErrorCode.OK
    out_rate = session.encoder.out_rate
    sent_samples = 0
    stop_blocked_writer(session, asyncio.current_task())
    try:
        async with contextlib.aclosing(session.events()) as events:
            async for event in events:
                await sink.send(event)
                if isinstance(event, AudioOut):
                    sent_samples += event.audio.num_samples
                    admission.sent_audio(event.audio.num_samples / out_rate)
                elif isinstance(event, Summary):
                    admission.observe(event)
        if session.cancelled:
            code = ErrorCode.CANCELLED
    except SessionError as err:
        code = err.code
        if reader is not None:  # it drops the client's messages once the session failed
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(reader), ERROR_DRAIN_S)
        await sink.fail(err)
    except (asyncio.CancelledError, GeneratorExit, ConnectionError):
        # The client went away, or the stall limit stopped a writer it no longer read.
        code = session.error.code if session.error is not None else ErrorCode.CANCELLED
        raise
    except Exception:
        code = ErrorCode.INTERNAL
        logger.exception("session %s failed", session.id)
        await sink.fail(SessionError(ErrorCode.INTERNAL, "internal error"))
    finally:
        await session.close()
        admission.release(key)
        detail = f", {sent_samples / out_rate:.2f} s of audio sent"
        if session.first_audio_at is not None:
            detail += f", first audio {session.time_to_first_audio_ms():.0f} ms"
        admission.record(method, code, key, session.id, detail)
    return code
