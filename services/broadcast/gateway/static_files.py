"""The browser client shipped inside the package, served from the gateway's own port."""

from __future__ import annotations

from functools import cache
from importlib import resources

# What the page may do: talk to its own origin, nothing fetched or run from anywhere else.
CONTENT_SECURITY_POLICY = (
    b"default-src 'self'; connect-src 'self' ws: wss:; style-src 'self'; script-src 'self'; "
    b"img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
_FILES = {
    b"/": ("index.html", b"text/html; charset=utf-8"),
    b"/index.html": ("index.html", b"text/html; charset=utf-8"),
    b"/app.js": ("app.js", b"text/javascript; charset=utf-8"),
    b"/style.css": ("style.css", b"text/css; charset=utf-8"),
}


@cache
def static_file(path: bytes) -> tuple[bytes, bytes] | None:
    """(content, content type) for a path of the web client, read once; None if not ours."""
    entry = _FILES.get(path)
    if entry is None:
        return None
    name, content_type = entry
    try:
        content = resources.files("broadcast.gateway").joinpath("web", name).read_bytes()
    except FileNotFoundError:
        return None
    return content, content_type
