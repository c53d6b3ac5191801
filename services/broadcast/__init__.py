"""broadcast: a real-time broadcast server on trio that scales out through Redis."""
