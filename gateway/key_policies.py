"""What each API key may ask for: its highest priority and its weight in the broker's fair share (pure).

An API key is configured as the key alone, or the key followed by options separated by spaces (in
GATEWAY_API_KEYS, entries are separated by commas; in GATEWAY_API_KEYS_FILE, one a line)::

    s3cret-key-of-the-batch-jobs-0001
    s3cret-key-of-the-web-frontend-01 max_priority=high share=2

* ``max_priority``: the highest ``priority`` (high, normal, low) its requests may carry. Default
  ``normal``: a plain key line means what it always meant, requests served in turn as before
  (normal or low); only a key given ``max_priority=high`` can move ahead of the others.
* ``share``: its weight in the broker's fair share between keys (broker/priorities.py), a number
  from 0.01 to 1000, default 1: while several keys' requests of one priority wait, the GPU time is
  split between them in proportion to their shares.

A request asking for more than its key allows is refused, 403 ``priority_not_allowed``, naming the
highest it may use, rather than quietly lowered: a client that asks for ``high`` and is served as
``normal`` would believe it had been served first. Without API keys there is nobody to tell apart
(the gateway listens on loopback, or its operator set GATEWAY_ALLOW_UNAUTHENTICATED), so every
priority is allowed, and requests have no owner.

The gateway sets the request's owner (``Generate.owner``: the key's name, :func:`key_name`) and
share from the key it came with, never from the request body.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from imagegen.protocol import DEFAULT_PRIORITY, DEFAULT_SHARE, MAX_SHARE, MIN_SHARE, PRIORITIES, priority_rank
from imagegen.settings import require

OPTIONS = ("max_priority", "share")


@dataclass(frozen=True)
class KeyPolicy:
    """An API key's allowance: the highest priority it may use, and its fair-share weight."""

    max_priority: str = DEFAULT_PRIORITY
    share: float = DEFAULT_SHARE

    def allows(self, priority: str) -> bool:
        return priority_rank(priority) >= priority_rank(self.max_priority)


# Without API keys: every priority, weight 1.
OPEN_POLICY = KeyPolicy(max_priority=PRIORITIES[0])


def key_name(key: str) -> str:
    """A key's lasting name: ``key-`` and the first 16 hex digits of its SHA-256 (the owner of its
    jobs, and of its requests in the broker's fair share and the /metrics owner label)."""
    return "key-" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def parse_key_options(env: str, words: list[str], where: str) -> KeyPolicy:
    """``max_priority=...`` and ``share=...`` words after a key; SettingsError naming ``env`` and
    ``where`` (never the key) for anything else."""
    values: dict[str, str] = {}
    for word in words:
        name, equals, value = word.partition("=")
        require(equals == "=" and name in OPTIONS, env,
                f"the key {where} has an option {word!r} this gateway does not know; write the key, then "
                f"options such as max_priority=high share=2 (options: {', '.join(OPTIONS)})")
        require(name not in values, env, f"the key {where} gives {name} twice")
        values[name] = value
    max_priority = values.get("max_priority", DEFAULT_PRIORITY)
    require(max_priority in PRIORITIES, env,
            f"the key {where} has max_priority={max_priority!r}; it must be one of {', '.join(PRIORITIES)}")
    share = DEFAULT_SHARE
    if "share" in values:
        try:
            share = float(values["share"])
        except ValueError:
            share = math.nan
        require(MIN_SHARE <= share <= MAX_SHARE, env,
                f"the key {where} has share={values['share']!r}; it must be a number from {MIN_SHARE:g} "
                f"to {MAX_SHARE:g}")
    return KeyPolicy(max_priority, share)


def priority_refusal(priority: str, policy: KeyPolicy) -> str | None:
    """Why ``priority`` is beyond ``policy``; None when it is allowed."""
    if policy.allows(priority):
        return None
    allowed = [p for p in PRIORITIES if policy.allows(p)]
    return (f"this API key may use priority {policy.max_priority!r} at most (allowed: {', '.join(allowed)}), "
            f"not {priority!r}: send one of those, or ask the operator for a key with max_priority={priority}")
