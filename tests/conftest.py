"""Where a test lives says what it may do.

* tests/unit/: no process, no socket, no server: pure classes, the protocol, settings, the docs.
* tests/integration/: sockets on 127.0.0.1, aiohttp's test servers, threads, the real tiny pipeline,
  all in this process (shared fixtures: tests/integration/conftest.py).
* tests/e2e/: everything that starts a process: the services, supervisord, scripts, compilers
  (shared fixtures: tests/e2e/conftest.py).
* tests/support/: helpers the tests import (``from tests.support.cluster import Cluster``); no tests.

Every test under tests/e2e/ is marked ``e2e`` here, so ``-m "not e2e"`` leaves out every test that
starts a process; and any other test that starts one fails, saying to move it
(tests/support/process_guard.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.process_guard import processes_refused

E2E_FOLDER = Path(__file__).resolve().parent / "e2e"


@pytest.hookimpl(tryfirst=True)  # before -m selects by marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(E2E_FOLDER):
            item.add_marker(pytest.mark.e2e)


# Each phase of a test not marked e2e runs with processes refused. A hook rather than an autouse
# fixture: a module- or session-scoped fixture is set up before any function-scoped one, and it is
# guarded too (a module fixture that compiles with torch.compile runs the C++ compiler).
@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    return (yield from _guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item):
    return (yield from _guarded(item))


def _guarded(item: pytest.Item):
    if item.get_closest_marker("e2e") is not None:
        return (yield)
    with processes_refused():
        return (yield)
