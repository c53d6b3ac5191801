"""The wire protocol, sans I/O: bytes and text in, events and bytes out (docs/protocol.md)."""
