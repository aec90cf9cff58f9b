"""The gateway's settings: environment variables, each with a matching command-line flag."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from imagegen.bounds import GATEWAY_DEFAULTS as DEFAULTS
from imagegen.bounds import IMAGE_SIDE_MULTIPLE, WIRE
from imagegen.protocol import MAX_DEADLINE_S
from imagegen.logs import log_format_setting, log_level_setting
from gateway.identity import gateway_id_problem
from gateway.key_policies import KeyPolicy, key_name, parse_key_options
from gateway.jobs.store import parse_store_url
from gateway.jobs.webhooks import parse_webhook_secret, read_webhook_secret_file
from imagegen.settings import parse_bool, parse_optional_str, require, setting, state_dir_setting
from imagegen.sockets import is_local_endpoint



MIN_API_KEY_CHARS = 16


class ApiKeys(tuple):
    """API keys, never shown: the start-up log prints every setting with repr()."""

    def __repr__(self) -> str:
        return f"<{len(self)} API key{'' if len(self) == 1 else 's'}, redacted>"


def _api_keys(text: str) -> ApiKeys | None:
    """GATEWAY_API_KEYS: comma-separated keys; empty means none."""
    return ApiKeys(key.strip() for key in text.split(",") if key.strip()) or None


def _check_api_key(env: str, key: str, where: str) -> None:
    """Refuse a key that is short or could not travel in an Authorization header. The message never
    shows the key itself."""
    require(len(key) >= MIN_API_KEY_CHARS, env,
            f"the key {where} is {len(key)} characters; API keys must be at least {MIN_API_KEY_CHARS}")
    require(all(33 <= ord(char) <= 126 for char in key), env,
            f"the key {where} must be printable ASCII without spaces")


def _key_entry(env: str, entry: str, where: str) -> tuple[str, KeyPolicy]:
    """One configured key: the key, then optional words max_priority=... share=... (gateway/key_policies.py)."""
    key, *options = entry.split()
    _check_api_key(env, key, where)
    return key, parse_key_options(env, options, where)


def read_api_keys_file(path: str) -> list[tuple[str, KeyPolicy]]:
    """GATEWAY_API_KEYS_FILE: one key per line, with its options after it; blank lines and lines
    starting with '#' are skipped."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        require(False, "GATEWAY_API_KEYS_FILE", f"cannot read {path!r}: {exc}")
    entries = []
    for number, line in enumerate(lines, 1):
        entry = line.strip()
        if entry and not entry.startswith("#"):
            entries.append(_key_entry("GATEWAY_API_KEYS_FILE", entry, f"on line {number} of {path!r}"))
    # A key file that holds no key would silently turn authentication off: refuse it.
    require(bool(entries), "GATEWAY_API_KEYS_FILE", f"{path!r} holds no key")
    return entries


def configured_key_policies(settings: "GatewaySettings") -> dict[str, KeyPolicy]:
    """Every key of GATEWAY_API_KEYS and GATEWAY_API_KEYS_FILE, checked, with its allowance; empty: no
    authentication. A key listed twice must have the same options both times."""
    entries = [_key_entry("GATEWAY_API_KEYS", entry, f"number {index}")
               for index, entry in enumerate(settings.api_keys or (), 1)]
    if settings.api_keys_file is not None:
        entries += read_api_keys_file(settings.api_keys_file)
    policies: dict[str, KeyPolicy] = {}
    for key, policy in entries:
        require(policies.setdefault(key, policy) == policy, "GATEWAY_API_KEYS",
                f"the key named {key_name(key)} is listed twice (GATEWAY_API_KEYS, GATEWAY_API_KEYS_FILE) with "
                f"different options; keep one line for it")
    return policies


def configured_api_keys(settings: "GatewaySettings") -> frozenset[str]:
    """Every key of GATEWAY_API_KEYS and GATEWAY_API_KEYS_FILE, checked; empty: no authentication."""
    return frozenset(configured_key_policies(settings))


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` reaches this machine only ("" and "0.0.0.0" mean every interface)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def listens_unauthenticated_beyond_loopback(settings: "GatewaySettings") -> bool:
    """True when GATEWAY_ALLOW_UNAUTHENTICATED is what lets the gateway start (logged as a warning)."""
    return not is_loopback(settings.host) and not configured_api_keys(settings)


@dataclass(frozen=True)
class GatewaySettings:
    """python -m gateway: the HTTP API (POST /generate, GET /stats, images) in front of the broker."""

    host: str = setting("GATEWAY_HOST", "127.0.0.1",
                        "interface the HTTP server listens on; loopback by default. Any other (e.g. 0.0.0.0, "
                        "every interface) needs API keys (GATEWAY_API_KEYS) or GATEWAY_ALLOW_UNAUTHENTICATED=true; "
                        "without either the gateway exits 2 at start")
    allow_unauthenticated: bool = setting("GATEWAY_ALLOW_UNAUTHENTICATED", False,
                                          "true: listen beyond loopback without API keys (anyone who can reach "
                                          "the port can use the GPUs); logged as a warning at every start",
                                          parse=parse_bool)
    body_timeout_s: float = setting("GATEWAY_BODY_TIMEOUT_S", 30.0,
                                    "seconds a client may take to send a request body; then 408 body_timeout and the "
                                    "connection is closed")
    max_connections: int = setting("GATEWAY_MAX_CONNECTIONS", 1000,
                                   "open HTTP connections at once, idle keep-alive ones included; beyond it a new "
                                   "connection gets 503 too_many_connections (with Retry-After) and is closed. "
                                   "Job event streams count here too, and have caps of their own (JOB_EVENT_STREAMS_MAX, "
                                   "JOB_EVENT_STREAMS_PER_JOB)")
    idle_timeout_s: float = setting("GATEWAY_IDLE_TIMEOUT_S", 75.0,
                                    "seconds a connection may stay open without a request in progress "
                                    "(keep-alive, or headers that never finish)")
    port: int = setting("GATEWAY_PORT", 8080, "HTTP port")
    broker_address: str = setting("BROKER_CLIENT_ADDRESS", "tcp://127.0.0.1:5555",
                                  "the broker's gateway endpoint: a loopback tcp:// address or the broker's "
                                  "ipc:// socket file (the link has no authentication); any other stops the gateway "
                                  "at start (exit 2) unless BROKER_ALLOW_UNAUTHENTICATED_CLIENTS=true")
    allow_unauthenticated_broker_link: bool = setting(
        "BROKER_ALLOW_UNAUTHENTICATED_CLIENTS", False,
        "true: allow a non-loopback BROKER_CLIENT_ADDRESS (prompts and images then cross the network "
        "unauthenticated and in clear; the broker needs the same setting)")
    image_dir: str = setting("IMAGE_DIR", "images", "folder where generated PNGs are kept and served from "
                                                 "(relative to the gateway's working directory)")
    image_retention_count: int = setting("IMAGE_RETENTION_COUNT", 10000,
                                         "most images kept; the oldest are deleted first")
    image_retention_s: float = setting("IMAGE_RETENTION_S", 86400.0,
                                       "images older than this many seconds are deleted (checked every minute)")
    public_base_url: str | None = setting("PUBLIC_BASE_URL", None,
                                          "base of image_url in responses; unset: the request's own scheme and host",
                                          parse=parse_optional_str)
    request_timeout_s: float = setting("REQUEST_TIMEOUT_S", 600.0,
                                       "seconds a request may take, queueing included, before 504; at most 86400")
    max_pending: int = setting("GATEWAY_MAX_PENDING", 5000,
                               "requests the gateway lets wait for the broker at once; beyond it, 503 overloaded")
    shutdown_timeout_s: float = setting("GATEWAY_SHUTDOWN_TIMEOUT_S", 60.0,
                                        "on SIGTERM, seconds to let requests in progress finish")
    retry_after_s: int = setting("RETRY_AFTER_S", 5, "Retry-After seconds sent with 503 answers")
    max_request_bytes: int = setting("MAX_REQUEST_BYTES", 65536, "largest accepted request body, in bytes (413 beyond)")
    # A request's bounds: the defaults are imagegen/bounds.py's table, which also says how far they may go.
    max_prompt_chars: int = setting("MAX_PROMPT_LENGTH", DEFAULTS.max_prompt_chars,
                                    "longest prompt or negative prompt, in characters")
    min_image_side: int = setting("MIN_IMAGE_SIDE", DEFAULTS.min_image_side, "smallest width or height, in pixels")
    max_image_side: int = setting("MAX_IMAGE_SIDE", DEFAULTS.max_image_side, "largest width or height, in pixels")
    max_image_pixels: int = setting("MAX_IMAGE_PIXELS", DEFAULTS.max_image_pixels, "largest width x height")
    max_inference_steps: int = setting("MAX_INFERENCE_STEPS", DEFAULTS.max_inference_steps,
                                       "most denoising steps a request may ask for")
    max_guidance_scale: float = setting("MAX_GUIDANCE_SCALE", DEFAULTS.max_guidance_scale, "largest guidance_scale")
    default_width: int = setting("DEFAULT_WIDTH", DEFAULTS.default_width, "width when a request gives none")
    default_height: int = setting("DEFAULT_HEIGHT", DEFAULTS.default_height, "height when a request gives none")
    default_steps: int = setting("DEFAULT_INFERENCE_STEPS", DEFAULTS.default_steps,
                                 "num_inference_steps when a request gives none")
    default_guidance_scale: float = setting("DEFAULT_GUIDANCE_SCALE", DEFAULTS.default_guidance_scale,
                                            "guidance_scale when a request gives none")
    api_keys: ApiKeys | None = setting("GATEWAY_API_KEYS", None,
                                       "comma-separated API keys (16+ printable ASCII characters each, without spaces) "
                                       "clients must send as "
                                       "'Authorization: Bearer KEY'; unset or empty: no authentication. A key may be "
                                       "followed by options, space-separated: max_priority=high|normal|low (the "
                                       "highest priority its requests may use; default normal) and share=N (its "
                                       "weight in the broker's fair share between keys, 0.01-1000; default 1), e.g. "
                                       "'KEY1 max_priority=high share=2,KEY2'",
                                       parse=_api_keys)
    api_keys_file: str | None = setting("GATEWAY_API_KEYS_FILE", None,
                                        "file of API keys, one per line, each optionally followed by max_priority= and "
                                        "share= as in GATEWAY_API_KEYS ('#' starts a comment line); "
                                        "combined with GATEWAY_API_KEYS; a missing or keyless file stops the gateway at "
                                        "start", parse=parse_optional_str)
    # Jobs, their events and webhooks: gateway/jobs/, docs/jobs.md.
    state_dir: str = state_dir_setting()
    gateway_id: str | None = setting(
        "GATEWAY_ID", None,
        "this gateway's lasting identity on the broker link (1 to 64 letters, digits, '.', '_', '-'): the "
        "broker sends each request's answer to the gateway that sent it, so a gateway restarted with the same "
        "identity gets its connection back, and answers that came while it was away wait at the broker for it "
        "to collect (BROKER_UNCLAIMED_RESULTS). Unset: one made at random and kept in STATE_DIR/gateway-id, "
        "locked while the gateway runs. Several gateways need one each (their own STATE_DIR, or GATEWAY_ID)",
        parse=parse_optional_str)
    job_store: str = setting("JOB_STORE", "sqlite",
                             "where jobs, their events and the webhook outbox live: sqlite (STATE_DIR/jobs.sqlite3, "
                             "one gateway) or redis (JOB_STORE_URL; every gateway with the same URL shares jobs)")
    job_store_url: str | None = setting("JOB_STORE_URL", None,
                                        "the Redis server of JOB_STORE=redis: redis://[:PASSWORD@]HOST:PORT/DB, "
                                        "rediss:// for TLS or unix:///PATH.sock (the password never appears in logs)",
                                        parse=parse_store_url)
    job_retention_s: float = setting("JOB_RETENTION_S", 86400.0,
                                     "finished jobs (status, result, events, pending webhooks) are deleted this many "
                                     "seconds after they finish; jobs not finished are kept")
    webhook_secret: str | None = setting("WEBHOOK_SECRET", None,
                                         "key that signs webhook deliveries, written whsec_<base64 of 24 to 64 bytes> "
                                         "(`python -m gateway.jobs.webhooks` makes one); unset, with no "
                                         "WEBHOOK_SECRET_FILE: jobs with a webhook are refused",
                                         parse=parse_webhook_secret)
    webhook_secret_file: str | None = setting("WEBHOOK_SECRET_FILE", None,
                                              "file holding the webhook secret instead of WEBHOOK_SECRET (which other "
                                              "users may see in the process's environment); unreadable or malformed: "
                                              "the gateway stops at start", parse=parse_optional_str)
    webhook_allow_private: bool = setting("WEBHOOK_ALLOW_PRIVATE", False,
                                          "DANGEROUS. true: webhooks may go to loopback, private (10/8, 172.16/12, "
                                          "192.168/16, fc00::/7), link-local (169.254/16, where cloud metadata "
                                          "services answer with credentials) and reserved addresses, so anyone who "
                                          "can submit a job can make the gateway send requests into its own network. "
                                          "For tests and closed networks only; false: public addresses only",
                                          parse=parse_bool)
    webhook_max_attempts: int = setting("WEBHOOK_MAX_ATTEMPTS", 8,
                                        "attempts at one webhook delivery, with exponential backoff between them "
                                        "(5 s, 20 s, 80 s... up to 6 h, with jitter); then it is given up")
    webhook_timeout_s: float = setting("WEBHOOK_TIMEOUT_S", 10.0,
                                       "seconds a receiver has to answer a delivery (connecting included) before "
                                       "the attempt counts as failed")
    progress_event_interval_s: float = setting("PROGRESS_EVENT_INTERVAL_S", 0.5,
                                               "a job records at most one progress event (and one queue-position "
                                               "change) per this many seconds; the newest step waiting is written "
                                               "when the interval ends, and a job's last step and its end always")
    job_event_streams_max: int = setting("JOB_EVENT_STREAMS_MAX", 500,
                                         "job event streams (GET /v1/jobs/{id}/events) open at once, all jobs "
                                         "together; beyond it 503 too_many_streams. Each is also an open "
                                         "connection (GATEWAY_MAX_CONNECTIONS)")
    job_event_streams_per_job: int = setting("JOB_EVENT_STREAMS_PER_JOB", 8,
                                             "event streams open at once for one job; beyond it 429 "
                                             "too_many_streams")
    log_level: str = log_level_setting()
    log_format: str = log_format_setting()

    def validate(self) -> None:
        keys = configured_api_keys(self)  # raises SettingsError for a short key or an unreadable or empty file
        require(bool(keys) or self.allow_unauthenticated or is_loopback(self.host), "GATEWAY_HOST",
                f"{self.host!r} is reachable from other machines and no API key is configured, so anyone "
                "who can reach the port could use the GPUs; set GATEWAY_API_KEYS (or GATEWAY_API_KEYS_FILE), "
                "or GATEWAY_HOST=127.0.0.1 behind a proxy on this host, or GATEWAY_ALLOW_UNAUTHENTICATED=true "
                "to accept that")
        require(self.allow_unauthenticated_broker_link or is_local_endpoint(self.broker_address),
                "BROKER_CLIENT_ADDRESS",
                f"{self.broker_address} is not on this machine, and the broker link has no authentication or "
                f"encryption; run the gateway on the broker's host (tcp://127.0.0.1:5555 or the broker's ipc:// "
                f"socket), or accept that with BROKER_ALLOW_UNAUTHENTICATED_CLIENTS=true on both")
        require(self.body_timeout_s > 0, "GATEWAY_BODY_TIMEOUT_S", "must be positive")
        require(self.max_connections >= 1, "GATEWAY_MAX_CONNECTIONS", "must be at least 1")
        require(self.idle_timeout_s > 0, "GATEWAY_IDLE_TIMEOUT_S", "must be positive")
        require(1 <= self.port <= 65535, "GATEWAY_PORT", "must be a TCP port (1-65535)")
        # The broker refuses a longer deadline as malformed: every request would then wait it out.
        require(0 < self.request_timeout_s <= MAX_DEADLINE_S, "REQUEST_TIMEOUT_S",
                f"must be positive and at most {MAX_DEADLINE_S:g} (a day)")
        require(self.max_pending >= 1, "GATEWAY_MAX_PENDING", "must be at least 1")
        require(self.shutdown_timeout_s >= 0, "GATEWAY_SHUTDOWN_TIMEOUT_S", "must not be negative")
        require(self.image_retention_count >= 1, "IMAGE_RETENTION_COUNT", "must be at least 1")
        require(self.image_retention_s > 0, "IMAGE_RETENTION_S", "must be positive")
        # The request bounds may narrow what the wire accepts, never widen it: the broker would drop
        # such a request as malformed.
        require(1 <= self.max_prompt_chars <= WIRE.prompt_chars, "MAX_PROMPT_LENGTH",
                f"must be between 1 and {WIRE.prompt_chars}")
        side, steps, guidance = WIRE.image_side, WIRE.inference_steps, WIRE.guidance_scale
        require(side.low <= self.min_image_side <= self.max_image_side <= side.high, "MAX_IMAGE_SIDE",
                f"need {side.low} <= MIN_IMAGE_SIDE <= MAX_IMAGE_SIDE <= {side.high}")
        require(steps.low <= self.max_inference_steps <= steps.high, "MAX_INFERENCE_STEPS",
                f"must be between {steps.low} and {steps.high}")
        require(guidance.low < self.max_guidance_scale <= guidance.high, "MAX_GUIDANCE_SCALE",
                f"must be in ({guidance.low:g}, {guidance.high:g}]")
        require(self.gateway_id is None or gateway_id_problem(self.gateway_id) is None, "GATEWAY_ID",
                gateway_id_problem(self.gateway_id or "") or "")
        require(self.job_store in ("sqlite", "redis"), "JOB_STORE", "must be sqlite or redis")
        require(self.job_store != "redis" or self.job_store_url is not None, "JOB_STORE_URL",
                "JOB_STORE=redis needs the Redis server's URL, e.g. redis://127.0.0.1:6379/0")
        require(self.job_retention_s > 0, "JOB_RETENTION_S", "must be positive")
        require(self.webhook_secret is None or self.webhook_secret_file is None, "WEBHOOK_SECRET_FILE",
                "set WEBHOOK_SECRET or WEBHOOK_SECRET_FILE, not both")
        if self.webhook_secret_file is not None:
            try:
                read_webhook_secret_file(self.webhook_secret_file)
            except ValueError as exc:
                require(False, "WEBHOOK_SECRET_FILE", str(exc))
        require(1 <= self.webhook_max_attempts <= 100, "WEBHOOK_MAX_ATTEMPTS", "must be between 1 and 100")
        require(0 < self.webhook_timeout_s <= 300, "WEBHOOK_TIMEOUT_S", "must be positive and at most 300")
        require(0 <= self.progress_event_interval_s <= 60, "PROGRESS_EVENT_INTERVAL_S", "must be between 0 and 60")
        require(self.job_event_streams_max >= 1, "JOB_EVENT_STREAMS_MAX", "must be at least 1")
        require(self.job_event_streams_per_job >= 1, "JOB_EVENT_STREAMS_PER_JOB", "must be at least 1")
        for env, default_side in (("DEFAULT_WIDTH", self.default_width), ("DEFAULT_HEIGHT", self.default_height)):
            require(default_side % IMAGE_SIDE_MULTIPLE == 0
                    and self.min_image_side <= default_side <= self.max_image_side, env,
                    f"must be a multiple of {IMAGE_SIDE_MULTIPLE} within MIN_IMAGE_SIDE..MAX_IMAGE_SIDE")
