"""NBD URIs (the NBD project's URI specification, as libnbd parses them): which ones
pyvduse accepts, and the form that may be shown or stored.

A URI can carry what identifies the client to the server: the TLS username in its authority
(``nbds://alice@host/``) and TLS parameters in its query (``tls-psk-file``,
``tls-certificates``). ``redact`` drops both, keeping what says which disk it is
(scheme, host, port, export, and the ``socket`` of a Unix URI): that form goes into logs,
``ctl status`` and the crash-recovery state file; the full URI stays in memory only.
"""

from __future__ import annotations

import urllib.parse

SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+vsock", "nbds+vsock")
#: Query parameters that say where the disk is (kept by ``redact``).
LOCATION_PARAMS = ("socket",)


def check(uri: str) -> str:
    """``uri`` if pyvduse can pass it to libnbd; ValueError with what is wrong otherwise."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in SCHEMES:
        raise ValueError(
            f"'{redact(uri)}' is not an NBD URI: use nbd://HOST[:PORT]/EXPORT, "
            "nbds://... (TLS) or nbd+unix:///EXPORT?socket=PATH"
        )
    query = urllib.parse.parse_qs(parts.query)
    if parts.scheme.endswith("+unix") and not query.get("socket"):
        raise ValueError(f"'{redact(uri)}' names no socket: add ?socket=PATH")
    if parts.scheme in ("nbd", "nbds") and not parts.hostname:
        raise ValueError(f"'{redact(uri)}' names no server: use nbd://HOST[:PORT]/EXPORT")
    return uri


def tls(uri: str) -> bool:
    return urllib.parse.urlsplit(uri).scheme.startswith("nbds")


def redact(uri: str) -> str:
    """``uri`` without credentials: no user name, no query parameter but the socket."""
    try:
        parts = urllib.parse.urlsplit(uri)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparsable URI>"
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port is not None else host
    kept = [
        (k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if k in LOCATION_PARAMS
    ]
    query = urllib.parse.urlencode(kept, safe="/")
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
