"""The chat page at GET / (`--no-ui` turns it off): one HTML file with its style and script inline,
shipped as package data and sent as it is, so it needs no build step and no network but this server's.

The page carries no secret, so / is open even with --api-key: the page asks for the key and sends it
with each request. Its Content-Security-Policy allows only the page's own script and style (by their
hashes) and connections back to this server: if the page's markdown rendering ever let model text
become HTML, nothing in it could run or load anything."""

from __future__ import annotations

import base64
import hashlib
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response


def inline_block(html: str, tag: str) -> str:
    """The text between the page's one <tag> and </tag>: what the browser hashes for the policy."""
    if html.count(f"<{tag}>") != 1 or html.count(f"</{tag}>") != 1:
        raise RuntimeError(f"the chat page must have exactly one inline <{tag}> block")
    return html.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]


def digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def page_headers(html: str) -> dict[str, str]:
    policy = ["default-src 'none'", f"script-src {digest(inline_block(html, 'script'))}",
              f"style-src {digest(inline_block(html, 'style'))}", "connect-src 'self'", "img-src data:",
              "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'"]
    return {"Content-Security-Policy": "; ".join(policy), "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def add_page(app: FastAPI) -> None:
    html = resources.files("flatstack.server").joinpath("ui", "index.html").read_text(encoding="utf-8")
    body, headers = html.encode(), page_headers(html)

    async def page() -> Response:
        return Response(body, media_type="text/html; charset=utf-8", headers=headers)

    app.add_api_route("/", page, methods=["GET"], include_in_schema=False)
