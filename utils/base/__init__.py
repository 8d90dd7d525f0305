"""What every layer reads: the error types, the host's cache and safe checkpoint loading, the
pinned versions."""
