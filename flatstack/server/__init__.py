"""`flatstack serve`: the OpenAI-compatible HTTP server over the engine.

protocol.py (request and response bodies, their mapping to SamplingParams), http.py (API key, body
limits and timeouts before any route), loop.py (the engine's thread and its command queue),
metrics.py (Prometheus exposition), routes.py (the routes), app.py (the app, and serve())."""

from flatstack.server.app import ServerConfig, create_app, serve

__all__ = ["ServerConfig", "create_app", "serve"]
