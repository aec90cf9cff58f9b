"""gateway/jobs/webhooks.py without a network: signatures, secrets, the event filter, the URL guard,
the backoff, the payload, and the settings that configure them (deliveries: tests/integration/test_webhooks.py)."""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest

from gateway.config import GatewaySettings
from gateway.jobs.store import Delivery
from gateway.jobs.webhooks import (
    DEFAULT_WEBHOOK_EVENTS, Backoff, GuardedResolver, WebhookSecret, WebhookSender, WebhookUrlRefused, address_refusal,
    check_webhook_url, configured_webhook_secret, generate_secret, parse_webhook_events, parse_webhook_secret,
    payload, read_webhook_secret_file, resolve_webhook_url, secret_bytes, selected_events, sign, signed_headers,
    verify, wants,
)
from imagegen import settings as settings_lib
from imagegen.settings import SettingsError
from tests.support.fake_resolver import FakeResolver

SECRET = generate_secret()
NOW = 1_795_800_000


def headers_for(body: bytes, msg_id: str = "msg_job.1", timestamp: int = NOW, secret: str = SECRET) -> dict:
    return signed_headers(secret, msg_id, timestamp, body)


# --- signatures ----------------------------------------------------------------------------------

def test_the_signature_is_the_standard_webhooks_one():
    # The example of the Standard Webhooks reference libraries: their secret, id, timestamp, body and signature.
    assert sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330,
                b'{"test": 2432232314}') == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signed_headers_verify():
    body = b'{"type":"job.succeeded"}'
    headers = headers_for(body)
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature", "content-type"}
    assert headers["webhook-timestamp"] == str(NOW) and headers["webhook-signature"].startswith("v1,")
    verify(SECRET, headers, body, now=NOW)
    verify(SECRET, {name.title(): value for name, value in headers.items()}, body, now=NOW + 300)  # any case


@pytest.mark.parametrize("tamper, message", [
    (lambda h, b: (h, b + b" "), "no signature matches"),
    (lambda h, b: ({**h, "webhook-id": "msg_other"}, b), "no signature matches"),
    (lambda h, b: ({**h, "webhook-timestamp": str(NOW + 1)}, b), "no signature matches"),
    (lambda h, b: ({**h, "webhook-signature": "v1,AAAA"}, b), "no signature matches"),
    (lambda h, b: ({**h, "webhook-signature": "v2," + h["webhook-signature"][3:]}, b), "no signature matches"),
    (lambda h, b: ({**h, "webhook-signature": "v1,é€"}, b), "no signature matches"),
    (lambda h, b: ({k: v for k, v in h.items() if k != "webhook-signature"}, b), "missing"),
    (lambda h, b: ({k: v for k, v in h.items() if k != "webhook-id"}, b), "missing"),
    (lambda h, b: ({**h, "webhook-timestamp": "soon"}, b), "whole number"),
])
def test_verify_refuses_a_changed_or_incomplete_delivery(tamper, message):
    body = b'{"type":"job.succeeded"}'
    headers, body = tamper(headers_for(body), body)
    with pytest.raises(ValueError, match=message):
        verify(SECRET, headers, body, now=NOW)


def test_verify_refuses_another_secret_and_old_or_future_timestamps():
    body = b"{}"
    with pytest.raises(ValueError, match="no signature matches"):
        verify(generate_secret(), headers_for(body), body, now=NOW)
    with pytest.raises(ValueError, match="too far"):
        verify(SECRET, headers_for(body), body, now=NOW + 301)
    with pytest.raises(ValueError, match="too far"):
        verify(SECRET, headers_for(body), body, now=NOW - 301)
    verify(SECRET, headers_for(body), body, now=NOW + 30, tolerance_s=30)
    with pytest.raises(ValueError, match="too far"):
        verify(SECRET, headers_for(body), body, now=NOW + 31, tolerance_s=30)


def test_verify_accepts_any_of_several_signatures():
    body = b"{}"
    headers = headers_for(body)
    old_secret = generate_secret()
    headers["webhook-signature"] = f"{sign(old_secret, 'msg_job.1', NOW, body)} {headers['webhook-signature']}"
    verify(SECRET, headers, body, now=NOW)
    verify(old_secret, headers, body, now=NOW)


# --- secrets -------------------------------------------------------------------------------------

def test_generated_secrets_are_fresh_32_byte_keys():
    assert SECRET.startswith("whsec_") and len(secret_bytes(SECRET)) == 32
    assert generate_secret() != generate_secret()


@pytest.mark.parametrize("text, message", [
    ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_"),
    ("whsec_not base64!", "not base64"),
    ("whsec_" + base64.b64encode(b"x" * 23).decode(), "23 bytes"),
    ("whsec_" + base64.b64encode(b"x" * 65).decode(), "65 bytes"),
])
def test_a_malformed_secret_is_refused_without_showing_it(text, message):
    with pytest.raises(ValueError, match=message) as raised:
        parse_webhook_secret(text)
    assert text not in str(raised.value)


def test_a_secret_never_shows_in_repr():
    secret = parse_webhook_secret(f"  {SECRET}\n")
    assert secret == SECRET and isinstance(secret, WebhookSecret)
    assert SECRET not in repr(secret) and parse_webhook_secret("") is None


def test_the_settings_take_the_secret_or_its_file_and_never_show_it(tmp_path):
    images = str(tmp_path / "images")
    settings = settings_lib.load(GatewaySettings, [], {"WEBHOOK_SECRET": SECRET, "IMAGE_DIR": images})
    assert configured_webhook_secret(settings) == SECRET
    assert SECRET not in settings_lib.describe(settings)
    secret_file = tmp_path / "webhook.secret"
    secret_file.write_text(SECRET + "\n")
    from_file = settings_lib.load(GatewaySettings, [], {"WEBHOOK_SECRET_FILE": str(secret_file),
                                                        "IMAGE_DIR": images})
    assert configured_webhook_secret(from_file) == SECRET and read_webhook_secret_file(str(secret_file)) == SECRET
    assert configured_webhook_secret(GatewaySettings(image_dir=images)) is None


def test_the_sender_is_made_from_the_settings(tmp_path):
    images = str(tmp_path / "images")
    assert WebhookSender.from_settings(None, GatewaySettings(image_dir=images)) is None  # no secret: no webhooks
    settings = settings_lib.load(GatewaySettings, [], {"WEBHOOK_SECRET": SECRET, "WEBHOOK_MAX_ATTEMPTS": "3",
                                                       "WEBHOOK_TIMEOUT_S": "2.5", "WEBHOOK_ALLOW_PRIVATE": "true",
                                                       "IMAGE_DIR": images})
    sender = WebhookSender.from_settings(None, settings)
    assert (sender.backoff.max_attempts, sender.timeout_s, sender.allow_private) == (3, 2.5, True)
    assert sender.lease_s > sender.timeout_s


@pytest.mark.parametrize("environ, variable", [
    ({"WEBHOOK_SECRET": "abc"}, "WEBHOOK_SECRET"),
    ({"WEBHOOK_SECRET_FILE": "/nonexistent/secret"}, "WEBHOOK_SECRET_FILE"),
    ({"WEBHOOK_SECRET": SECRET, "WEBHOOK_SECRET_FILE": "/nonexistent/secret"}, "WEBHOOK_SECRET_FILE"),
    ({"JOB_STORE": "postgres"}, "JOB_STORE"),
    ({"JOB_STORE": "redis"}, "JOB_STORE_URL"),
    ({"JOB_STORE_URL": "http://redis:6379"}, "JOB_STORE_URL"),
    ({"JOB_RETENTION_S": "0"}, "JOB_RETENTION_S"),
    ({"WEBHOOK_MAX_ATTEMPTS": "0"}, "WEBHOOK_MAX_ATTEMPTS"),
    ({"WEBHOOK_TIMEOUT_S": "0"}, "WEBHOOK_TIMEOUT_S"),
    ({"WEBHOOK_ALLOW_PRIVATE": "maybe"}, "WEBHOOK_ALLOW_PRIVATE"),
])
def test_bad_job_and_webhook_settings_stop_the_gateway_naming_the_variable(environ, variable):
    with pytest.raises(SettingsError, match=variable) as raised:
        settings_lib.load(GatewaySettings, [], environ)
    assert SECRET not in str(raised.value)


def test_the_redis_url_is_logged_without_its_password():
    settings = settings_lib.load(GatewaySettings, [], {"JOB_STORE": "redis",
                                                       "JOB_STORE_URL": "redis://:s3cret-pw@redis.internal:6379/2"})
    assert settings.job_store_url == "redis://:s3cret-pw@redis.internal:6379/2"
    described = settings_lib.describe(settings)
    assert "s3cret-pw" not in described and "redis://:***@redis.internal:6379/2" in described


def test_the_defaults():
    settings = GatewaySettings()
    assert (settings.job_store, settings.job_store_url, settings.state_dir) == ("sqlite", None, "state")
    assert (settings.webhook_allow_private, settings.webhook_max_attempts, settings.webhook_timeout_s) == \
           (False, 8, 10.0)
    assert settings.job_retention_s == 86400.0 and settings.webhook_secret is None


# --- the webhook_events filter -------------------------------------------------------------------

def test_the_filter_maps_webhook_events_to_sse_events():
    assert selected_events(["start"]) == {"started", "restarted"}
    assert selected_events(["completed"]) == {"succeeded", "failed", "cancelled"}
    assert selected_events(["queued", "progress", "preview"]) == {"queued", "progress", "preview"}
    assert selected_events(["succeeded", "progress"]) == {"succeeded", "progress"}  # SSE names select themselves
    assert selected_events(None) == selected_events(DEFAULT_WEBHOOK_EVENTS) == \
           {"started", "restarted", "succeeded", "failed", "cancelled"}
    assert wants(None, "failed") and not wants(None, "progress") and wants(["progress"], "progress")


def test_a_clients_filter_is_checked():
    assert parse_webhook_events(["completed", "start", "completed"]) == ("completed", "start")
    for bad in ([], "completed", ["done"], [1], None):
        with pytest.raises(ValueError, match="webhook_events"):
            parse_webhook_events(bad)
    with pytest.raises(ValueError, match=r"unknown \['done'\].*'completed'"):
        parse_webhook_events(["completed", "done"])


# --- the URL guard -------------------------------------------------------------------------------

@pytest.mark.parametrize("address, reason", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fd00::1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("fe80::1%eth0", "link-local"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("239.255.255.250", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("240.0.0.1", "reserved"), ("100.64.0.1", "not globally routable"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"), ("::ffff:169.254.169.254", "link-local"),
    ("2002:7f00:1::", "loopback"),         # 6to4 around 127.0.0.1
    ("64:ff9b::a00:1", "private"),         # NAT64 around 10.0.0.1
])
def test_addresses_a_webhook_may_not_reach(address, reason):
    assert address_refusal(address) == reason


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8",
                                     "64:ff9b::808:808"])
def test_public_addresses_are_allowed(address):
    assert address_refusal(address) is None


def test_allow_private_allows_private_ranges_but_not_multicast_or_unspecified():
    for address in ("127.0.0.1", "::1", "10.0.0.1", "169.254.169.254", "::ffff:127.0.0.1", "100.64.0.1"):
        assert address_refusal(address, allow_private=True) is None
    assert address_refusal("224.0.0.1", allow_private=True) == "multicast"
    assert address_refusal("0.0.0.0", allow_private=True) == "unspecified"


@pytest.mark.parametrize("url, message", [
    ("ftp://example.com/x", "scheme"), ("file:///etc/passwd", "scheme"), ("gopher://example.com", "scheme"),
    ("example.com/hook", "scheme"), ("http:///path", "no host"), ("", "http"), (42, "http"),
    ("http://example.com:99999/", "cannot be parsed"), ("https://" + "a" * 3000 + ".com", "characters"),
    ("http://127.0.0.1:8080/hook", "loopback"), ("http://[::1]/hook", "loopback"),
    ("http://[::ffff:127.0.0.1]/hook", "loopback"), ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("http://10.0.0.5/hook", "private"), ("http://localhost:9000/hook", "localhost"),
    ("http://api.localhost/hook", "localhost"), ("http://2130706433/hook", "canonical"),
    ("http://127.1/hook", "canonical"), ("http://0x7f000001/hook", "canonical"),
])
def test_urls_refused_at_submission(url, message):
    with pytest.raises(WebhookUrlRefused, match=message):
        check_webhook_url(url)


def test_urls_allowed_at_submission():
    for url in ("https://example.com/hooks/imagegen?x=1", "http://93.184.215.14:8080/", "HTTPS://Example.COM./x",
                "https://[2606:4700:4700::1111]/x"):
        assert check_webhook_url(url) == url
    assert check_webhook_url("http://127.0.0.1:9000/hook", allow_private=True)
    assert check_webhook_url("http://localhost:9000/hook", allow_private=True)


async def test_a_name_is_resolved_at_submission_and_refused_for_any_private_address():
    resolver = FakeResolver({"hooks.example.com": ["93.184.215.14"], "internal.example.com": ["10.0.0.7"],
                             "metadata.example.com": ["169.254.169.254"]})
    assert await resolve_webhook_url("https://hooks.example.com/x", resolver=resolver) == "https://hooks.example.com/x"
    with pytest.raises(WebhookUrlRefused, match="10.0.0.7, a private address"):
        await resolve_webhook_url("https://internal.example.com/x", resolver=resolver)
    with pytest.raises(WebhookUrlRefused, match="link-local"):
        await resolve_webhook_url("https://metadata.example.com/x", resolver=resolver)
    with pytest.raises(WebhookUrlRefused, match="does not resolve"):
        await resolve_webhook_url("https://nowhere.example.com/x", resolver=resolver)
    assert await resolve_webhook_url("https://internal.example.com/x", allow_private=True, resolver=resolver)


async def test_the_guarded_resolver_checks_every_lookup_so_rebinding_is_caught():
    inner = FakeResolver({"rebind.example.com": ["93.184.215.14", "127.0.0.1"]})
    guarded = GuardedResolver(allow_private=False, inner=inner)
    assert (await guarded.resolve("rebind.example.com", 443))[0]["host"] == "93.184.215.14"  # at submission
    with pytest.raises(WebhookUrlRefused, match="127.0.0.1, a loopback address"):  # at delivery
        await guarded.resolve("rebind.example.com", 443)
    assert inner.asked == ["rebind.example.com", "rebind.example.com"]


# --- backoff -------------------------------------------------------------------------------------

def test_backoff_grows_exponentially_up_to_a_cap_then_gives_up():
    backoff = Backoff(max_attempts=8, base_s=5, factor=4, max_delay_s=3600, jitter=lambda: 1.0)
    assert [backoff.next_attempt_at(1000.0, n) - 1000.0 for n in range(1, 8)] == \
           [5.0, 20.0, 80.0, 320.0, 1280.0, 3600.0, 3600.0]
    assert backoff.next_attempt_at(1000.0, 8) is None and backoff.next_attempt_at(1000.0, 9) is None
    assert Backoff(max_attempts=1).next_attempt_at(0.0, 1) is None


def test_backoff_jitter_keeps_a_delay_between_half_and_all_of_its_step():
    assert Backoff(jitter=lambda: 0.0).delay_s(2) == 10.0
    assert Backoff(jitter=lambda: 0.5).delay_s(2) == 15.0
    delays = [Backoff().delay_s(3) for _ in range(200)]
    assert all(40.0 <= delay <= 80.0 for delay in delays) and len(set(delays)) > 1
    assert Backoff(max_attempts=100, jitter=lambda: 1.0).delay_s(100) == 6 * 3600.0  # no overflow


def test_backoff_refuses_nonsense():
    for bad in ({"max_attempts": 0}, {"base_s": 0}, {"factor": 0.5}, {"max_delay_s": 1}):
        with pytest.raises(ValueError):
            Backoff(**bad)


# --- the payload ---------------------------------------------------------------------------------

def test_the_payload_is_standard_webhooks_shaped_and_the_same_each_attempt():
    delivery = Delivery("msg_J.7", "J", 7, "progress", {"step": 3, "steps": 20}, 1_795_800_000.25, "https://x/",
                        attempts=0, next_attempt_at=0.0)
    body = payload(delivery)
    assert payload(dataclasses.replace(delivery, attempts=3, next_attempt_at=99.0)) == body
    assert json.loads(body) == {"type": "job.progress", "timestamp": "2026-11-27T17:20:00.250000Z",
                                "data": {"step": 3, "steps": 20, "job_id": "J", "event_id": 7}}
