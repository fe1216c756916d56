"""`FieldError`: a value that is wrong for one named field of a request.

The field travels as data (`field`), so that a transport can report it in its own way (the
OpenAI error object's `param`, the WebSocket's `field`) without reading it back out of the
message. Other exceptions about one field (the voice store's "no such voice") say which in a
`field` attribute too.
"""

from __future__ import annotations


class FieldError(ValueError):
    """`field` is wrong: the message is "field: reason" (or "field reason" with sep=" ")."""

    def __init__(self, field: str, reason: str, sep: str = ": "):
        super().__init__(f"{field}{sep}{reason}")
        self.field = field
        self.reason = reason
