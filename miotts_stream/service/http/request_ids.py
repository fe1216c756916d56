"""Request ids on the HTTP port: every request gets one, and every response carries it
(`X-Request-Id`); the server's log line of the request and the sessions it opens name it."""

from __future__ import annotations

from aiohttp import web

from miotts_stream.service.admission import new_request_id

REQUEST_ID = web.RequestKey("request_id", str)  # the request's id, in aiohttp's mapping


def request_id_of(request: web.Request) -> str:
    """The id the request was given (its `X-Request-Id`, and its sessions' ids)."""
    return request[REQUEST_ID]


@web.middleware
async def request_ids(request: web.Request, handler):
    """Give every request an id; `send_request_id` puts it on its response."""
    request[REQUEST_ID] = new_request_id()
    return await handler(request)


async def send_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Every response (errors, streams and WebSocket handshakes included) says which request
    it answers, as OpenAI's API does: clients log it and label their metrics with it."""
    if REQUEST_ID in request:
        response.headers["X-Request-Id"] = request[REQUEST_ID]
