"""Typed settings read from environment variables, each with a matching command-line flag.

A service declares its settings as a frozen dataclass whose fields use :func:`setting`: the
environment variable (the seed's names, e.g. ``MAX_BATCH_WAIT_TIME``), a parser and a help text.
:func:`load` builds the dataclass: flag beats environment beats default. The flag of a setting is
its variable's name in lower case with dashes (``--max-batch-wait-time``), so the two never drift.
Bad values raise :class:`SettingsError` naming the variable, the value and what is expected.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence, TypeVar

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class SettingsError(ValueError):
    """A setting has a value the service cannot use; the message says which and how to fix it."""


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected true or false")


def parse_optional_int(text: str) -> int | None:
    """An integer, or empty / 'auto' for None (e.g. MAX_BATCH_SIZE unset means auto-detect)."""
    stripped = text.strip().lower()
    return None if stripped in ("", "auto") else int(stripped)


def parse_optional_str(text: str) -> str | None:
    """A string, or None when empty (an unset path or name)."""
    return text.strip() or None


def parse_int_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def setting(env: str, default: Any, help: str, parse: Callable[[str], Any] | None = None) -> Any:
    """Declare one dataclass field backed by environment variable ``env``.

    ``parse`` turns the variable's text into the field's value; by default the type of ``default``
    decides (bool, int, float or str)."""
    if parse is None:
        parse = parse_bool if isinstance(default, bool) else type(default)
    return dataclasses.field(default=default, metadata={"env": env, "help": help, "parse": parse})


def flag_name(env: str) -> str:
    return "--" + env.lower().replace("_", "-")


def _settings_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "env" in f.metadata]


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per setting; its help shows the variable and the default."""
    for f in _settings_fields(cls):
        default = f.default if f.default is not None else "unset"
        parser.add_argument(
            flag_name(f.metadata["env"]),
            dest=f.name,
            default=None,
            metavar=f.metadata["env"],
            help=f"{f.metadata['help']} (env {f.metadata['env']}, default {default})",
        )


def load(cls: type[T], argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
         description: str = "") -> T:
    """Build settings dataclass ``cls`` from flags (``argv``), then ``environ``, then defaults."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(description=description or cls.__doc__)
    add_arguments(parser, cls)
    flags = vars(parser.parse_args([] if argv is None else list(argv)))
    values = {}
    for f in _settings_fields(cls):
        env = f.metadata["env"]
        text = flags[f.name] if flags[f.name] is not None else environ.get(env)
        if text is None:
            continue
        try:
            values[f.name] = f.metadata["parse"](text)
        except ValueError as exc:
            raise SettingsError(f"{env}={text!r} is not valid: {exc}. {f.metadata['help']}") from None
    settings = cls(**values)
    validate = getattr(settings, "validate", None)
    if validate is not None:
        validate()
    return settings


def describe(settings: Any) -> str:
    """One line listing every setting as ENV=value, for the start-up log."""
    return " ".join(f"{f.metadata['env']}={getattr(settings, f.name)!r}" for f in _settings_fields(type(settings)))


def require(condition: bool, env: str, message: str) -> None:
    """Raise SettingsError naming ``env`` unless ``condition`` holds (for validate() methods)."""
    if not condition:
        raise SettingsError(f"{env}: {message}")


def state_dir_setting() -> Any:
    """STATE_DIR, the same in every service that keeps state on disk."""
    return setting("STATE_DIR", "state",
                   "folder for what the service keeps across restarts: torch.compile's cache "
                   "(STATE_DIR/compile-cache; `python -m gpu_worker.model.compile_cache export FILE` "
                   "copies it to another host with the same GPU and software) in the worker, the job store "
                   "(STATE_DIR/jobs.sqlite3 with JOB_STORE=sqlite) and its identity on the broker link "
                   "(STATE_DIR/gateway-id, unless GATEWAY_ID is set) in the gateway. Relative paths are "
                   "from the directory the service starts in")
