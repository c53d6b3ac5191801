"""broadcast's Python clients. The real-time client is here (``from broadcast.client import
connect``; realtime.py, docs/client.md); the server API's clients are in
``broadcast.client.api`` (docs/api.md); the command line is ``broadcast-cli``."""

from broadcast.client.realtime import *  # noqa: F403  # its __all__ is the public face
from broadcast.client.realtime import __all__ as __all__
