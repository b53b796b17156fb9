"""Serving: the CPU inference engine, terminal chat and the HTTP API."""
