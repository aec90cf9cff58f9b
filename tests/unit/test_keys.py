"""The authorized-keys folder as the broker sees it while running (imagegen.keys.KeyAllowList)."""

from __future__ import annotations

import shutil

import pytest
import zmq.auth

from imagegen.keys import KeyAllowList, main as keys_main


@pytest.fixture
def folders(tmp_path):
    made, authorized = tmp_path / "made", tmp_path / "authorized"
    for name in ("host-a", "host-b"):
        assert keys_main(["worker", name, str(made)]) == 0
    authorized.mkdir()
    shutil.copy(made / "host-a.key", authorized)
    return made, authorized


def public(made, name: str) -> bytes:
    return zmq.auth.load_certificate(made / f"{name}.key")[0]


def test_keys_copied_in_are_admitted_and_removed_ones_reported(folders):
    made, authorized = folders
    allow = KeyAllowList(authorized)
    assert allow.callback("*", public(made, "host-a")) and not allow.callback("*", public(made, "host-b"))
    assert allow.refused == 1

    shutil.copy(made / "host-b.key", authorized)
    assert allow.callback("*", public(made, "host-b"))  # read again at the handshake itself

    (authorized / "host-a.key").unlink()
    assert allow.refresh() and not allow.refresh()  # read again once: nothing changed since
    assert allow.keys == {public(made, "host-b"): "host-b"}
    assert not allow.callback("*", public(made, "host-a"))


def test_a_half_copied_key_keeps_the_keys_read_before_until_it_is_whole(folders, caplog):
    made, authorized = folders
    allow = KeyAllowList(authorized)
    whole = (made / "host-b.key").read_bytes()
    (authorized / "host-b.key").write_bytes(whole[:40])  # the copy has not finished
    assert not allow.refresh()
    assert allow.keys == {public(made, "host-a"): "host-a"}
    assert "could not read the authorized keys" in caplog.text and "keeping the 1 read before" in caplog.text

    (authorized / "host-b.key").write_bytes(whole)
    assert allow.refresh()
    assert set(allow.keys.values()) == {"host-a", "host-b"}


def test_an_unreadable_folder_at_start_is_an_error(tmp_path):
    (tmp_path / "bad.key").write_text("not a key")
    with pytest.raises(ValueError, match="bad.key"):
        KeyAllowList(tmp_path)
