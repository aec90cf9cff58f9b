"""python -m imagegen.settings_doc: render docs/settings.md from the settings classes.

Each setting is declared once, with :func:`imagegen.settings.setting` (variable, default, help) in
its service's settings class; this module turns those declarations into one table per service, so
the reference cannot drift from the code. ``tests/unit/test_settings_doc.py`` fails when
docs/settings.md differs from what this prints. After adding or changing a setting::

    .venv/bin/python -m imagegen.settings_doc > docs/settings.md

This is the one module of ``imagegen`` that imports the services (lazily, in :func:`services`): it
documents them, and they do not import it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from imagegen import protocol
from imagegen.settings import flag_name

OUTPUT = "docs/settings.md"
REGENERATE = f".venv/bin/python -m imagegen.settings_doc > {OUTPUT}"


@dataclass(frozen=True)
class Service:
    """One table: a heading, the command that reads these settings, and the settings class."""

    title: str
    command: str
    cls: type
    note: str = ""


def services() -> list[Service]:
    from broker.config import BrokerSettings
    from gateway.config import GatewaySettings
    from gpu_worker.config import WorkerSettings
    from launcher.supervisor_config import LauncherSettings

    return [
        Service("Worker", "python -m gpu_worker", WorkerSettings,
                "One process per GPU: it loads the model, forms batches (docs/batching.md) and runs them."),
        Service("Launcher", "./scripts/serve.sh, python -m launcher.supervisor_config", LauncherSettings,
                "Writes run/supervisord.conf with one worker per GPU before supervisord starts."),
        Service("Broker", "python -m broker", BrokerSettings,
                "Queues requests, hands them to workers and watches that the workers are alive."),
        Service("Gateway", "python -m gateway", GatewaySettings,
                "The HTTP API (docs/api.md): validates requests, keeps the images and serves them."),
    ]


def fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "env" in f.metadata]


def format_default(env: str, value: Any) -> str:
    """A default as an operator would type it: ``true``, ``5``, ``0.5``, unset for None."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = f"`{value}`"
    if env.endswith("_BYTES") and isinstance(value, int) and value >= 1024:
        for unit, size in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
            if value % size == 0:
                return f"{text} ({value // size} {unit})"
    return text


_WORD = re.compile(r"(?<![\w`/.-])([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)(=[\w.:/-]*\w)?(?![\w`])")
_DOC = re.compile(r"(?<![\w/\[])docs/([\w-]+\.md)")


def format_help(text: str, names: Iterable[str]) -> str:
    """A help string as a table cell: setting names in code style, docs/*.md as links, no stray pipes."""
    known = set(names)
    text = text.replace("|", "\\|")
    text = _WORD.sub(lambda m: f"`{m.group(0)}`" if m.group(1) in known else m.group(0), text)
    return _DOC.sub(lambda m: f"[docs/{m.group(1)}]({m.group(1)})", text)


def table(cls: type, names: Iterable[str]) -> str:
    names = list(names)
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    for f in fields(cls):
        env = f.metadata["env"]
        lines.append(f"| `{env}` | {format_default(env, f.default)} | {format_help(f.metadata['help'], names)} |")
    return "\n".join(lines)


def intro() -> str:
    low_s, high_s = protocol.HEARTBEAT_INTERVAL_RANGE_S
    bounds = (f"batch sizes up to {protocol.MAX_BATCH_IMAGES}, waits up to {protocol.MAX_BATCH_WAIT_S:g} s, "
              f"`ADAPTIVE_BATCH_THRESHOLD` up to {protocol.MAX_ADAPTIVE_THRESHOLD:,}, `WORKER_MAX_IN_FLIGHT` up to "
              f"{protocol.MAX_CAPACITY:,}, worker names up to {protocol.MAX_ID_CHARS} characters, host names "
              f"{protocol.MAX_HOST_CHARS}, `MODEL_ID` {protocol.MAX_MODEL_ID_CHARS}; the gateway's `REQUEST_TIMEOUT_S` "
              f"up to {protocol.MAX_DEADLINE_S:g} s; the broker's `HEARTBEAT_INTERVAL_S` {low_s:g} to {high_s:g} s")
    return "\n\n".join([
        "# Settings",
        f"Generated from the settings classes by `{REGENERATE}`. Edit the help texts in "
        "`gpu_worker/config.py`, `launcher/supervisor_config.py`, `broker/config.py` and `gateway/config.py`, "
        "never this file: a test fails when the two differ.",
        "Every setting is an environment variable and a command-line flag of the same name in lower case with "
        f"dashes: `MAX_BATCH_WAIT_TIME=2` or `python -m gpu_worker {flag_name('MAX_BATCH_WAIT_TIME')} 2`; a flag "
        "beats the environment, which beats the default. supervisord passes its environment to the programs it "
        "starts, so variables exported before `./scripts/serve.sh` reach every service (a value in "
        "`supervisord.conf`'s `environment=` line for one program wins over an exported one). "
        "`python -m broker --help` (or `gateway`, `gpu_worker`) lists them too.",
        "A bad value stops the service at start (exit 2) with a message naming the variable, and so does a value "
        f"the broker would refuse on the wire: {bounds}.",
        "`LOG_LEVEL` and `LOG_FORMAT` exist in every service ([logs](operations.md#logs-and-request-ids)).",
    ]) + "\n"


def render(items: Sequence[Service] | None = None) -> str:
    """The whole of docs/settings.md."""
    items = services() if items is None else list(items)
    names = {f.metadata["env"] for s in items for f in fields(s.cls)}
    parts = [intro()]
    for service in items:
        commands = ", ".join(f"`{c.strip()}`" for c in service.command.split(","))
        note = format_help(service.note, names) if service.note else ""
        parts.append(f"## {service.title} ({commands})\n\n" + (note + "\n\n" if note else "")
                     + table(service.cls, names) + "\n")
    return "\n".join(parts)


def main() -> None:
    print(render(), end="")


if __name__ == "__main__":
    main()
