"""The web page at ``GET /``: type a prompt, watch its job run, see the image, watch the cluster's queue.

One self-contained HTML file (``gateway/static/index.html``: plain HTML, CSS and JavaScript, no
build step, nothing loaded from other sites, so it works offline). The page itself talks to the
gateway's public API only: the job API (POST /v1/jobs, each job's event stream read with fetch,
GET /v1/jobs/{id} while no stream is to be had, DELETE to cancel), GET /stats every 1.5 s, and the
image URLs. Each job has a card: queue position, a progress bar per step, the latest preview (with
"Live preview"), the image, and a Cancel button. With API
keys configured, GET / needs none (gateway/auth.py exempts it); the page asks for a key and sends
it as ``Authorization: Bearer`` on its API calls, keeping it in the browser's localStorage.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

INDEX_HTML = Path(__file__).resolve().parent / "static" / "index.html"


async def index_page(request: web.Request) -> web.FileResponse:
    """GET /: the page. no-cache: a browser revalidates it, so a new gateway version shows at once."""
    return web.FileResponse(INDEX_HTML, headers={"Content-Type": "text/html; charset=utf-8",
                                                 "Cache-Control": "no-cache",
                                                 "X-Content-Type-Options": "nosniff"})
