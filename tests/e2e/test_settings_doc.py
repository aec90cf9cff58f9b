"""docs/settings.md's generator as a command: python -m imagegen.settings_doc prints the same document
(tests/unit/test_settings_doc.py checks the document)."""

from __future__ import annotations

import subprocess
import sys

from imagegen import settings_doc
from tests.support.paths import REPO


def test_the_command_line_prints_the_same_document():
    done = subprocess.run([sys.executable, "-m", "imagegen.settings_doc"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout == settings_doc.render()
