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

import functools
import hashlib
import hmac
from typing import Any, Awaitable, Callable

from aiohttp import web

from gateway.config import GatewaySettings, configured_api_keys, configured_key_policies
from gateway.key_policies import OPEN_POLICY, KeyPolicy, key_name, priority_refusal
from gateway.validation import FieldError

# The error code of a request whose priority is above its API key's max_priority (HTTP 403).
PRIORITY_NOT_ALLOWED = "priority_not_allowed"
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
# Its allowance: highest priority and fair-share weight (gateway/key_policies.py).
API_KEY_POLICY = web.RequestKey("api_key_policy", KeyPolicy)


def key_policy_of(request: web.Request) -> KeyPolicy:
    """What the key ``request`` came with may ask for (gateway/key_policies.py); with keys off, anything."""
    return request.get(API_KEY_POLICY, OPEN_POLICY)


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


def ranking_of(request: web.Request, priority: str) -> dict[str, Any]:
    """What a request of ``priority`` goes to the broker with (BrokerClient.generate's ``priority``,
    ``owner`` and ``share``): its key's name as owner and the key's share, never anything the client
    sent. Raises FieldError (403, ``priority_not_allowed``) when the key may not use ``priority``."""
    policy = key_policy_of(request)
    refusal = priority_refusal(priority, policy)
    if refusal is not None:
        raise FieldError("priority", refusal, status=403, code=PRIORITY_NOT_ALLOWED)
    return {"priority": priority, "owner": api_key_name_of(request), "share": policy.share}


@functools.lru_cache(maxsize=8)
def _policies_by_name(settings: GatewaySettings) -> dict[str, KeyPolicy]:
    return {key_name(key): policy for key, policy in configured_key_policies(settings).items()}


def share_of(settings: GatewaySettings, owner: str) -> float:
    """The fair-share weight of the key named ``owner`` (a job's owner); 1 for none or a key no longer
    configured."""
    policy = _policies_by_name(settings).get(owner) if owner else None
    return policy.share if policy is not None else OPEN_POLICY.share


def load_key_policies(settings: GatewaySettings) -> dict[str, KeyPolicy]:
    """The configured keys with their allowances (max_priority=, share=); empty: no authentication."""
    return configured_key_policies(settings)


def api_key_middleware(keys: frozenset[str] | dict[str, KeyPolicy]):
    """An aiohttp middleware that lets a request through only with one of ``keys`` (or to an exempt
    route); ``keys`` may map each key to its allowance (a plain set: the default one for each)."""
    if not keys:
        raise ValueError("api_key_middleware needs at least one key; with none, add no middleware")
    ordered = sorted(keys)
    digests = tuple(_digest(key) for key in ordered)
    names = tuple(key_name(key) for key in ordered)
    policies = tuple(keys[key] if isinstance(keys, dict) else KeyPolicy() for key in ordered)

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
        request[API_KEY_POLICY] = policies[matched]
        return await handler(request)

    return require_api_key
