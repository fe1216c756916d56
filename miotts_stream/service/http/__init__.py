"""HTTP and WebSocket transport of the speech engine (aiohttp), beside the gRPC one.

`app.HttpTransport` serves OpenAI's `/v1/audio/speech`, `/v1/models`, `/v1/voices`, the
WebSocket stream `/v1/stream` and the browser demo at `/`. Keys, limits, voices and metrics
are the gRPC server's (`service/admission.py`); `errors.py` maps the engine's error codes to
HTTP statuses, OpenAI error objects and WebSocket close codes; `json_input.py` reads clients'
JSON; `connections.py` bounds each connection's time and their number.
"""

from .app import HttpOptions, HttpTransport

__all__ = ["HttpOptions", "HttpTransport"]
