"""broadcast: a real-time broadcast server on trio that scales out through Redis."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    # ``broadcast.__version__``, read from the installed package's metadata only when asked for,
    # so importing broadcast stays cheap.
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("broadcast")
        except PackageNotFoundError:  # a source tree that was never installed
            return "0+unknown"
    raise AttributeError(f"module 'broadcast' has no attribute {name!r}")
