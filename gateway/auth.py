"""Optional API keys: with keys configured, every request must carry ``Authorization: Bearer <key>``.

Keys come from GATEWAY_API_KEYS (comma-separated) and GATEWAY_API_KEYS_FILE (one per line), both
checked at start-up (gateway.config); none configured means no authentication at all, and
``create_app`` then adds no middleware.

What needs a key: every route except the exempt ones below, unknown routes included. So without a
valid key an unknown path or a wrong method answers 401 (nothing about which routes exist is
revealed); with one, the usual JSON 404 or 405.

A missing or wrong key answers 401 with the gateway's JSON error shape, code ``unauthorized``, and
``WWW-Authenticate: Bearer``. The presented token is compared with every configured key, without
stopping at a match, through ``hmac.compare_digest`` on SHA-256 digests (equal lengths, so neither a
key's content nor its length shows in the timing).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Awaitable, Callable

from aiohttp import web

from gateway.config import GatewaySettings, configured_api_keys
from gateway.context import openai_shaped

# (method, route pattern) pairs that need no key. The route pattern (the matched resource's
# canonical form, e.g. "/images/{name}") is compared rather than the raw path, so an odd spelling of
# a path cannot make a protected route look exempt.
#  - /healthz and /readyz: probes of load balancers and orchestrators, which carry no key;
#  - /images/{name}: image URLs are capability URLs: 122 random bits nobody can guess, handed only to
#    whoever made the image, and loaded by browsers (<img src>) that send no Authorization header;
#  - /openapi.json: the API description, public by design;
#  - /: the web page (gateway/web_page.py), static HTML holding no data; its own API calls carry
#    the key the user types into it.
# HEAD goes with GET: aiohttp's add_get serves both.
EXEMPT_ROUTES = frozenset(
    (method, pattern)
    for pattern in ("/", "/healthz", "/readyz", "/images/{name}", "/openapi.json")
    for method in ("GET", "HEAD")
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The name of the key a request came with ("" with keys off): what owns the jobs it submits
# (gateway/jobs/). A digest of the key, never the key itself, so a job store holds no secret.
API_KEY_NAME = web.RequestKey("api_key_name", str)


def key_name(key: str) -> str:
    """A key's lasting name: ``key-`` and the first 16 hex digits of its SHA-256."""
    return "key-" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def api_key_name_of(request: web.Request) -> str:
    """The name of the key ``request`` came with; "" when keys are off."""
    return request.get(API_KEY_NAME, "")


def load_api_keys(settings: GatewaySettings) -> frozenset[str]:
    """The configured keys (GATEWAY_API_KEYS plus GATEWAY_API_KEYS_FILE); empty: no authentication.

    Raises SettingsError naming the variable for a short key or an unreadable or empty key file."""
    return configured_api_keys(settings)


def _digest(text: str) -> bytes:
    # surrogatepass: a header aiohttp decoded with odd bytes still hashes instead of raising.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def _bearer_token(request: web.Request) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (scheme case-insensitive), or None."""
    parts = request.headers.get("Authorization", "").split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1].strip() or None


def _is_exempt(request: web.Request) -> bool:
    resource = request.match_info.route.resource  # None for unknown routes and wrong methods
    return resource is not None and (request.method, resource.canonical) in EXEMPT_ROUTES


def unauthorized(message: str, openai_shape: bool = False) -> web.Response:
    """401; under /v1/ (the OpenAI-compatible API, gateway/openai_api.py) in OpenAI's error shape."""
    if openai_shape:
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None,
                          "code": "invalid_api_key"}}
    else:
        body = {"error": {"code": "unauthorized", "message": message, "field": None}}
    return web.json_response(body, status=401, headers={"WWW-Authenticate": "Bearer"})


def api_key_middleware(keys: frozenset[str]):
    """An aiohttp middleware that lets a request through only with one of ``keys`` (or to an exempt route)."""
    if not keys:
        raise ValueError("api_key_middleware needs at least one key; with none, add no middleware")
    ordered = sorted(keys)
    digests = tuple(_digest(key) for key in ordered)
    names = tuple(key_name(key) for key in ordered)

    @web.middleware
    async def require_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if _is_exempt(request):
            return await handler(request)
        token = _bearer_token(request)
        openai_shape = openai_shaped(request.path)
        if token is None:
            return unauthorized("this endpoint needs an API key: send 'Authorization: Bearer <key>'", openai_shape)
        presented = _digest(token)
        matched = None
        for index, digest in enumerate(digests):  # every key, no early exit
            if hmac.compare_digest(presented, digest):
                matched = index
        if matched is None:
            return unauthorized("the API key is not valid", openai_shape)
        request[API_KEY_NAME] = names[matched]
        return await handler(request)

    return require_api_key
