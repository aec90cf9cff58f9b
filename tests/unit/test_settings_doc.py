"""docs/settings.md is generated from the settings classes: one source of truth for every setting."""

from __future__ import annotations

import dataclasses

import pytest

from imagegen import settings_doc
from imagegen.settings import setting
from tests.support.paths import REPO

DOC = REPO / settings_doc.OUTPUT


def test_docs_settings_md_is_what_the_generator_prints():
    assert DOC.read_text() == settings_doc.render(), (
        f"{settings_doc.OUTPUT} is out of date with the settings classes: run {settings_doc.REGENERATE}")


@pytest.mark.parametrize("service", settings_doc.services(), ids=lambda s: s.title)
def test_each_service_has_a_table_with_every_setting_its_default_and_help(service):
    text = DOC.read_text()
    section = text.split(f"## {service.title} (", 1)[1].split("\n## ", 1)[0]
    rows = {line.split(" | ")[0].strip("| `"): line for line in section.splitlines() if line.startswith("| `")}
    for field in settings_doc.fields(service.cls):
        env = field.metadata["env"]
        assert env in rows, f"{env} has no row in the {service.title} table"
        assert settings_doc.format_default(env, field.default) in rows[env]
        assert rows[env].split(" | ", 2)[2].strip(" |")  # a meaning, not an empty cell


@dataclasses.dataclass(frozen=True)
class Toy:
    """A settings class of the kind the services declare."""

    limit: int = setting("TOY_LIMIT_BYTES", 2 * 1024 ** 3, "most memory | see TOY_MODE=fast and docs/api.md")
    mode: str | None = setting("TOY_MODE", None, "fast or slow; unset: TOY_LIMIT_BYTES decides", parse=str)
    on: bool = setting("TOY_ON", False, "turn it on; OTHER_NAME stays as it is")


def test_a_changed_help_text_or_default_changes_the_document():
    toy = [settings_doc.Service("Toy", "python -m toy", Toy, "A toy.")]
    text = settings_doc.render(toy)
    assert "## Toy (`python -m toy`)\n\nA toy.\n" in text
    assert ("| `TOY_LIMIT_BYTES` | `2147483648` (2 GiB) | most memory \\| see `TOY_MODE=fast` and "
            "[docs/api.md](api.md) |") in text
    assert "| `TOY_MODE` | unset | fast or slow; unset: `TOY_LIMIT_BYTES` decides |" in text
    assert "| `TOY_ON` | `false` | turn it on; OTHER_NAME stays as it is |" in text  # not a setting: plain

    @dataclasses.dataclass(frozen=True)
    class Changed(Toy):
        on: bool = setting("TOY_ON", True, "turn it off")

    changed = settings_doc.render([settings_doc.Service("Toy", "python -m toy", Changed, "A toy.")])
    assert "| `TOY_ON` | `true` | turn it off |" in changed and changed != text
