#!/usr/bin/env bash
# Create .venv with everything the service and its tests need; reinstall when pyproject.toml changes.
# torch comes first and pinned: on a machine without a GPU, torch==2.13.0 is a small CPU build;
# left open, pip would pull a multi-GB CUDA build. Set TORCH_SPEC to choose another build.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.installed-from
want="$(sha256sum pyproject.toml | cut -c1-16) ${TORCH_SPEC:-torch==2.13.0}"
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo "bootstrap: installing into .venv (first run takes a few minutes)" >&2
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[test]"
echo "$want" > "$stamp"
