"""The Gradio panel served through ComfyUI's own origin, at /emolora/panel/ui/ (and /api/emolora/panel/ui/).

The sidebar tab embeds the panel in an iframe. ComfyUI pages may forbid frames from other origins (with
--disable-api-nodes it sends `Content-Security-Policy: frame-src 'self'`; the panel listens on its own port), and
a browser on another machine cannot reach the panel's 127.0.0.1 at all. So ComfyUI forwards the iframe's requests
to the panel: same origin, no CORS, ComfyUI's own access rules. Gradio learns its public root from the
X-Gradio-Server header (the URL the browser used) and builds its asset, API and event-stream URLs under it.
"""

from __future__ import annotations

import logging

log = logging.getLogger("emolora.nodes")

PREFIX = "/emolora/panel/ui"
# Per-hop headers, and the browser's Origin/Referer (ComfyUI's own middleware has already checked them; Gradio
# would refuse a non-loopback origin that is not its own).
DROP_REQUEST = {"host", "connection", "keep-alive", "te", "trailers", "transfer-encoding", "upgrade",
                "content-length", "accept-encoding", "origin", "referer", "proxy-authorization"}
DROP_RESPONSE = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "upgrade",
                 "proxy-authenticate", "trailers", "te"}
_session = None


def _client():
    global _session
    import aiohttp

    if _session is None or _session.closed:
        _session = aiohttp.ClientSession(auto_decompress=True,
                                         timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
    return _session


def public_root(request) -> str:
    """The panel's root URL as the browser sees it (scheme, host and whatever path prefix ComfyUI is under)."""
    at = request.path.find(PREFIX)
    return f"{request.scheme}://{request.host}{request.path[: at + len(PREFIX)]}"


async def forward(request, panel_url: str):
    """Forward one request to the panel at panel_url; event streams are streamed, everything else buffered."""
    from aiohttp import web

    tail = request.match_info.get("tail", "")
    root = public_root(request)
    target = panel_url.rstrip("/") + "/" + tail + (f"?{request.query_string}" if request.query_string else "")
    headers = {k: v for k, v in request.headers.items() if k.lower() not in DROP_REQUEST}
    headers["X-Gradio-Server"] = f"{root}/{tail}"
    headers["Accept-Encoding"] = "identity"
    body = await request.read() if request.body_exists else None
    async with _client().request(request.method, target, headers=headers, data=body, allow_redirects=False) as up:
        out = {k: v for k, v in up.headers.items() if k.lower() not in DROP_RESPONSE}
        if "Location" in out and out["Location"].startswith(panel_url.rstrip("/")):
            out["Location"] = root + out["Location"][len(panel_url.rstrip("/")):]
        if not up.headers.get("Content-Type", "").startswith("text/event-stream"):
            return web.Response(status=up.status, headers=out, body=await up.read())
        resp = web.StreamResponse(status=up.status, headers=out)
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp
