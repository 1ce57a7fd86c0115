"""The management socket's protocol: JSON lines over a unix stream socket.

Each request is one JSON object on one line, ``{"cmd": "status"}``; each gets exactly one
reply line, in order: ``{"result": {...}}`` on success or
``{"error": {"code": CODE, "message": TEXT}}``. A request may carry an ``"id"`` (any JSON
value), which its reply repeats. Arguments are further keys of the request object
(``{"cmd": "resize", "size": "2G", "shrink": false}``); an unknown key is an error.
"""

from __future__ import annotations

import json
import os
from typing import Any

#: Where daemons put their sockets by default: ``/run/pyvduse/NAME.sock``.
RUN_DIR = "/run/pyvduse"

#: The longest request line the server reads (a longer one is refused and the client dropped).
MAX_LINE = 64 * 1024

# Error codes.
BAD_REQUEST = "bad-request"  # not a JSON object on one line, no "cmd", line too long
UNKNOWN_COMMAND = "unknown-command"  # "cmd" names no command
INVALID_ARGUMENT = "invalid-argument"  # an argument is missing, unknown or has a bad value
UNSUPPORTED = "unsupported"  # the command cannot apply to this device or backend
BUSY = "busy"  # another request of the same kind is still running
FAILED = "failed"  # the command was valid but did not succeed (an OS error, for instance)

ERROR_CODES = (BAD_REQUEST, UNKNOWN_COMMAND, INVALID_ARGUMENT, UNSUPPORTED, BUSY, FAILED)

Json = dict[str, Any]


class OpsError(Exception):
    """A request that gets an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        assert code in ERROR_CODES, code
        self.code = code
        self.message = message


def default_control_path(name: str) -> str:
    return os.path.join(RUN_DIR, f"{name}.sock")


def encode(obj: Json) -> bytes:
    """One reply or request line."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=False).encode() + b"\n"


def decode_request(line: bytes) -> Json:
    """Parse one request line; OpsError(bad-request) when it is not a request object."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise OpsError(BAD_REQUEST, f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise OpsError(BAD_REQUEST, 'a request is a JSON object, like {"cmd": "status"}')
    cmd = obj.get("cmd")
    if not isinstance(cmd, str):
        raise OpsError(BAD_REQUEST, 'the request has no "cmd" string')
    return obj


def ok_reply(result: Json, request_id: Any = None) -> Json:
    reply: Json = {"result": result}
    if request_id is not None:
        reply["id"] = request_id
    return reply


def error_reply(code: str, message: str, request_id: Any = None) -> Json:
    reply: Json = {"error": {"code": code, "message": message}}
    if request_id is not None:
        reply["id"] = request_id
    return reply
