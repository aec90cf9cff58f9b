"""The gateway's lasting identity on the broker link (gateway/identity.py, GATEWAY_ID)."""

from __future__ import annotations

import pytest

from gateway.config import GatewaySettings
from gateway.identity import GATEWAY_ID_FILE, GatewayIdentityError, resolve_gateway_identity
from imagegen.settings import SettingsError, load


def test_an_id_is_made_once_and_kept_in_state_dir(tmp_path):
    first = resolve_gateway_identity(None, str(tmp_path / "state"))
    first.release()
    again = resolve_gateway_identity(None, str(tmp_path / "state"))
    again.release()
    assert first.gateway_id == again.gateway_id and first.gateway_id.startswith("gw-")
    assert (tmp_path / "state" / GATEWAY_ID_FILE).read_text().strip() == first.gateway_id
    assert (tmp_path / "state" / GATEWAY_ID_FILE).stat().st_mode & 0o077 == 0
    other = resolve_gateway_identity(None, str(tmp_path / "elsewhere"))
    other.release()
    assert other.gateway_id != first.gateway_id


def test_a_second_gateway_on_the_same_state_dir_is_refused_while_the_first_runs(tmp_path):
    running = resolve_gateway_identity(None, str(tmp_path))
    with pytest.raises(GatewayIdentityError, match="another gateway is running"):
        resolve_gateway_identity(None, str(tmp_path))
    running.release()
    resolve_gateway_identity(None, str(tmp_path)).release()


def test_gateway_id_wins_over_the_file_and_must_be_a_plain_name(tmp_path):
    identity = resolve_gateway_identity("gateway-a.1", str(tmp_path))
    assert identity.routing_id == b"gateway-a.1" and identity.source == "GATEWAY_ID"
    assert not (tmp_path / GATEWAY_ID_FILE).exists()
    with pytest.raises(SettingsError, match="GATEWAY_ID"):
        load(GatewaySettings, environ={"GATEWAY_ID": "-starts-with-a-dash"})
    with pytest.raises(SettingsError, match="GATEWAY_ID"):
        load(GatewaySettings, environ={"GATEWAY_ID": "x" * 65})
    assert load(GatewaySettings, environ={"GATEWAY_ID": "gw1"}).gateway_id == "gw1"


def test_a_damaged_id_file_says_how_to_fix_it(tmp_path):
    (tmp_path / GATEWAY_ID_FILE).write_text("not an id!\n")
    with pytest.raises(GatewayIdentityError, match="delete the file"):
        resolve_gateway_identity(None, str(tmp_path))
