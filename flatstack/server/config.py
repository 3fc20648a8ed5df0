"""The server's settings: the single source of their defaults and help text for `serve` and the CLI
(whose options are derived from these fields). Imports nothing heavy."""

from __future__ import annotations

from dataclasses import dataclass

from flatstack.engine.config import setting


@dataclass
class ServerConfig:
    served_model_name: str = setting("", "the model name clients ask for (default: the path's name)")
    api_key: str | None = setting(None, "require Authorization: Bearer KEY on every route but /health")
    max_queue: int = setting(1024, "sequences accepted at once; past it, 503")
    max_body_bytes: int = setting(4 << 20, "largest request body, chunked or not; past it, 413", size=True)
    metrics_without_key: bool = setting(False, "serve /metrics without the API key")
    header_timeout: float = setting(10.0, "seconds for a new connection to send its request's headers")
    body_timeout: float = setting(30.0, "seconds for a request body to arrive; past it, 408")
    keep_alive_timeout: float = setting(5.0, "seconds an idle connection stays open between requests")
    max_connections: int = setting(512, "connections open at once; past it, 503")
    slow_reader_timeout: float = setting(30.0, "a stream whose client reads nothing this long is ended")
    ui: bool = setting(True, "serve the chat page at /")
