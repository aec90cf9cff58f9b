"""The SQLite job store: the shared behaviour (tests/support/job_store_contract.py) on a file in the
test's folder, and what is SQLite's own: WAL, the file's place and mode, errors."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from gateway.config import GatewaySettings
from gateway.jobs.store import SQLITE_FILE, JobStoreUnavailable, SqliteJobStore, new_job, open_job_store
from tests.support.job_store_contract import JobStoreContract


class TestSqliteJobStore(JobStoreContract):
    @pytest.fixture
    def open_store(self, tmp_path: Path):
        opened: list[SqliteJobStore] = []

        def open_store(**kwargs) -> SqliteJobStore:
            store = SqliteJobStore(tmp_path / "state" / SQLITE_FILE, **kwargs)
            opened.append(store)
            return store

        yield open_store
        for store in opened:
            try:
                store.close()
            except sqlite3.ProgrammingError:
                pass


def test_the_default_store_is_a_wal_file_in_state_dir_readable_by_its_owner_only(tmp_path):
    settings = GatewaySettings(image_dir=str(tmp_path / "images"), state_dir=str(tmp_path / "state"))
    store = open_job_store(settings)
    try:
        assert isinstance(store, SqliteJobStore)
        path = tmp_path / "state" / "jobs.sqlite3"
        assert store.path == path
        made = store.create(new_job("", {"prompt": "p"}, 1.0))
    finally:
        store.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with sqlite3.connect(path) as db:  # another reader sees the committed job, and the journal mode
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT id FROM jobs").fetchall() == [(made.id,)]


def test_a_state_dir_that_cannot_be_written_is_a_clear_error(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(JobStoreUnavailable, match="STATE_DIR"):
        SqliteJobStore(blocker / SQLITE_FILE)


def test_a_file_that_is_not_a_database_is_unavailable_not_a_crash(tmp_path):
    path = tmp_path / SQLITE_FILE
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(JobStoreUnavailable):
        SqliteJobStore(path)
