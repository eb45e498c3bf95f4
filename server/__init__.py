"""dsv32.server: command line (and, next, the OpenAI-compatible HTTP server, chat encoding and parsers)."""
