"""JSON from clients (request bodies, WebSocket messages): parsed, and every string checked.

JSON's `\\udc00` escapes can carry lone surrogates, which are not Unicode text: protobuf, the
tokenizer and the database refuse them somewhere deep inside. They are refused here instead,
as INVALID_ARGUMENT naming the field that holds one.
"""

from __future__ import annotations

import json
from typing import Any

from miotts_stream.service.admission import invalid
from miotts_stream.service.engine import ErrorCode, SessionError


def parse_json(text: str | bytes, what: str) -> Any:
    """The JSON value of `text`; SessionError when it is not JSON (`what` says whose) or holds
    a string that is not valid Unicode."""
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise SessionError(ErrorCode.INVALID_ARGUMENT, f"{what}: not JSON ({err})") from None
    check_strings(value)
    return value


def check_strings(value: Any, path: str = "") -> None:
    """INVALID_ARGUMENT naming the first field (dotted path; list items as [i]) whose name or
    string value holds a lone surrogate."""
    if isinstance(value, str):
        if not _is_text(value):
            raise invalid(path or "request", "not valid Unicode (a lone surrogate)")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not _is_text(key):
                raise invalid(path or "request", "a field name is not valid Unicode")
            check_strings(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_strings(item, f"{path}[{index}]")


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
