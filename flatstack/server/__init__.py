"""`flatstack serve`: the OpenAI-compatible HTTP server over the engine.

config.py (ServerConfig), protocol.py (request and response bodies, their mapping to SamplingParams),
http.py (API key, body limits and timeouts before any route), metrics.py (Prometheus exposition),
routes.py (the routes), page.py (the chat page at /: ui/index.html), app.py (the app, and serve()).
The engine runs on the engine loop's thread (flatstack/engine/loop.py).
"""

from __future__ import annotations

import importlib

EXPORTS = {"ServerConfig": "config", "create_app": "app", "serve": "app"}  # resolved on first use (PEP 562)
__all__ = list(EXPORTS)


def __getattr__(name: str):
    if name not in EXPORTS:
        raise AttributeError(f"module 'flatstack.server' has no attribute {name!r}")
    return getattr(importlib.import_module(f"flatstack.server.{EXPORTS[name]}"), name)
