"""docs/architecture.md stays true to the code: every file, class, function and constant it names exists.

The page names code in backticks: a path (`broker/state.py`), then names from that file
(`BrokerState.submit()`, `Batcher`, `RUNNING_DEADLINE_GRACE_S`). A name is checked against the
Python files named before it in the same block (a paragraph, a list item or a table row): it must
be defined in one of them (a class, a function, a method, an attribute set in a class, a module
constant), or imported into one from a module of this repository that defines it. A name with no
file before it in its block is an error, so no name goes unchecked. Upper-case words that are no
constant of those files must be a setting's environment variable or a wire command. Relative links
must lead to files that exist.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import re
from pathlib import Path

import pytest

from broker.config import BrokerSettings
from gateway.config import GatewaySettings
from gpu_worker.config import WorkerSettings
from imagegen.protocol import Command
from launcher.supervisor_config import LauncherSettings
from tests.support.paths import REPO

DOC = REPO / "docs" / "architecture.md"

PATH = re.compile(r"^[\w.-]+(/[\w.-]+)*\.(py|md|sh|conf|json|toml)$")
CALL = re.compile(r"^_?[A-Za-z_]\w*(\.\w+)*\(\)$")
CAMEL = re.compile(r"^_?[A-Z][a-z0-9]\w*(\.\w+)*$")
UPPER = re.compile(r"^_?[A-Z][A-Z0-9_]*[A-Z0-9]$")
# Upper-case words of the page that are neither settings nor code constants: ZeroMQ's own names.
ZMQ_WORDS = {"ROUTER_MANDATORY", "ROUTER_HANDOVER", "MAXMSGSIZE", "DONTWAIT"}
ENV_NAMES = {f.metadata["env"] for cls in (BrokerSettings, GatewaySettings, WorkerSettings, LauncherSettings)
             for f in dataclasses.fields(cls)}


def blocks(text: str) -> list[list[str]]:
    """The page's blocks, each the list of its backticked tokens in order: a blank line, a heading,
    a list item or a table row starts a new block; fenced code is left out."""
    result: list[list[str]] = [[]]
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            result.append([])
            continue
        if fenced:
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "|", "- ", "* ")) or re.match(r"\d+\. ", stripped):
            result.append([])
        result[-1] += re.findall(r"`([^`\n]+)`", line)
    return [block for block in result if block]


@functools.cache
def definitions(path: Path) -> tuple[dict[str, ast.AST], dict[str, str]]:
    """A module's top-level definitions (name -> node) and what it imports (name -> module)."""
    tree = ast.parse(path.read_text(), str(path))
    defined: dict[str, ast.AST] = {}
    imported: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            defined[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    defined[target.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined[node.target.id] = node
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                imported[alias.asname or alias.name] = node.module
    return defined, imported


def class_members(node: ast.ClassDef) -> set[str]:
    """Methods, class-level fields, and attributes any method sets on ``self``."""
    members: set[str] = set()
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
            members.add(item.name)
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            members.add(item.target.id)
        elif isinstance(item, ast.Assign):
            members.update(t.id for t in item.targets if isinstance(t, ast.Name))
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) \
                and isinstance(sub.value, ast.Name) and sub.value.id == "self":
            members.add(sub.attr)
    return members


def module_path(module: str) -> Path | None:
    for candidate in (REPO / (module.replace(".", "/") + ".py"), REPO / module.replace(".", "/") / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def defines(path: Path, dotted: str, follow_imports: bool = True) -> bool:
    """Whether ``dotted`` (``Name``, ``Class.member``) is defined in ``path``, or imported into it
    from a module of this repository that defines it."""
    first, *rest = dotted.split(".")
    defined, imported = definitions(path)
    node = defined.get(first)
    if node is None:
        source = module_path(imported[first]) if follow_imports and first in imported else None
        return source is not None and defines(source, dotted, follow_imports=False)
    if not rest:
        return True
    if not isinstance(node, ast.ClassDef) or len(rest) != 1:
        return False
    return rest[0] in class_members(node)


def check(text: str) -> list[str]:
    """Every problem with the page's backticked names and relative links."""
    problems: list[str] = []
    for block in blocks(text):
        files: list[Path] = []
        for token in block:
            if PATH.match(token):
                if not (REPO / token).is_file():
                    problems.append(f"`{token}`: no such file")
                elif token.endswith(".py"):
                    files.append(REPO / token)
                continue
            if CALL.match(token) or CAMEL.match(token):
                name = token.removesuffix("()")
            elif UPPER.match(token):
                if token in ENV_NAMES or token in Command.__members__ or token in ZMQ_WORDS:
                    continue
                name = token
            else:
                continue  # prose in backticks: a command line, a JSON shape, an attribute in lower case
            if not files:
                problems.append(f"`{token}`: no Python file named before it in its block")
            elif not any(defines(path, name) for path in files):
                problems.append(f"`{token}`: not defined in {', '.join(str(p.relative_to(REPO)) for p in files)}")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("/"):
            problems.append(f"link {target}: the page links inside the repository only")
        elif not (DOC.parent / target).is_file():
            problems.append(f"link {target}: no such file")
    return problems


def test_every_file_and_name_the_architecture_page_names_exists():
    problems = check(DOC.read_text())
    assert not problems, "docs/architecture.md names what does not exist:\n" + "\n".join(problems)


def test_the_architecture_page_covers_every_service_package():
    text = DOC.read_text()
    for package in ("gateway", "broker", "gpu_worker", "imagegen", "simulator"):
        assert f"`{package}/" in text, f"docs/architecture.md names no file of {package}/"


@pytest.mark.parametrize("page, problem", [
    ("`broker/state.py` `BrokerState.no_such_method()`", "not defined"),
    ("`broker/state.py` `NoSuchClass`", "not defined"),
    ("`broker/no_such_file.py`", "no such file"),
    ("`BrokerState`", "no Python file named before it"),
    ("`broker/state.py`\n\n`BrokerState`", "no Python file named before it"),  # a blank line ends the block
    ("`gpu_worker/shell/worker.py` `NO_SUCH_CONSTANT`", "not defined"),
    ("`gpu_worker/shell/link.py` `Welcome.no_such_field`", "not defined"),
    ("[x](no-such-page.md)", "no such file"),
    ("[x](https://example.com)", "inside the repository only"),
])
def test_the_check_finds_what_does_not_exist(page, problem):
    problems = check(page)
    assert problems and problem in problems[0], problems


@pytest.mark.parametrize("page", [
    "`broker/state.py` `BrokerState.submit()` `BrokerState.queue` `UNITS_AHEAD_RECOMPUTE_S`",
    "`gpu_worker/shell/link.py` `Welcome` `Welcome.broker_epoch`",  # imported from imagegen/protocol.py
    "`gateway/app.py` `create_app()` `MAX_REQUEST_BYTES` `CANCEL`",  # a setting's variable, a command
    "`gpu_worker/shell/worker.py` `Worker._on_message()` and then `gpu_worker/decisions/worker_state.py` `WorkerState` and "
    "`WorkerState.queued_deadlines`",
])
def test_the_check_accepts_what_exists(page):
    assert check(page) == []
