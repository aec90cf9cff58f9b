"""The README and docs/settings.md stay true to the code (starting the services: tests/e2e/test_service_start.py)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from broker.config import BrokerSettings
from gateway.config import GatewaySettings
from gpu_worker.config import WorkerSettings
from launcher.supervisor_config import LauncherSettings
from tests.support.paths import REPO

README = (REPO / "README.md").read_text()
SETTINGS_DOC = (REPO / "docs" / "settings.md").read_text()  # generated: tests/unit/test_settings_doc.py


@pytest.mark.parametrize("settings_class", [BrokerSettings, GatewaySettings, WorkerSettings, LauncherSettings])
def test_every_setting_is_documented_in_docs_settings_md(settings_class):
    missing = [f.metadata["env"] for f in dataclasses.fields(settings_class)
               if f"| `{f.metadata['env']}` |" not in SETTINGS_DOC]
    assert not missing, (f"docs/settings.md does not document {missing}: "
                         f"run .venv/bin/python -m imagegen.settings_doc > docs/settings.md")


def _relative_links(path: Path) -> list[str]:
    import re

    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text())
    return [link for link in links if not link.startswith(("http://", "https://", "mailto:"))]


def test_the_readme_links_the_reference_docs():
    links = _relative_links(REPO / "README.md")
    for doc in ("docs/settings.md", "docs/api.md", "docs/batching.md", "docs/operations.md", "docs/scale-out.md"):
        assert doc in links, f"README.md does not link {doc}"


@pytest.mark.parametrize("doc", ["README.md", "docs/settings.md", "docs/api.md", "docs/batching.md",
                                 "docs/operations.md"])
def test_links_stay_inside_the_repository_and_lead_to_files_that_exist(doc):
    path = REPO / doc
    links = _relative_links(path)
    assert links, f"{doc} links nothing"
    outside = [link for link in links if not (path.parent / link).resolve().is_relative_to(REPO)]
    assert not outside, f"{doc} links outside the repository: {outside}"
    missing = [link for link in links if not (path.parent / link).exists()]
    assert not missing, f"{doc} links files that do not exist: {missing}"


def test_readme_starts_with_the_serve_and_test_commands_and_ci_runs_the_test_command():
    first_block = README.split("```bash", 1)[1].split("```", 1)[0]
    assert "./scripts/serve.sh" in first_block and "./scripts/test.sh" in first_block
    assert "./scripts/test.sh" in (REPO / ".ci" / "run").read_text()
    for script in ("scripts/serve.sh", "scripts/test.sh", ".ci/run"):
        assert os.access(REPO / script, os.X_OK), f"{script} must be executable"
