"""aiter.utility (fake)."""
