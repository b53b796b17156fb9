"""Serving: `slm generate`, `slm chat` (the terminal chat) over the engine."""
