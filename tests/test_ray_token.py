"""The private token of a local Ray instance never outlives it: the user's own RAY_AUTH_* come back (issue 9's
review: a local run in a notebook wiped the credentials a later cluster connection needed). No Ray instance runs."""

from __future__ import annotations

import os

import pytest

rr = pytest.importorskip("ormo.engine.ray_runtime")

pytestmark = pytest.mark.ray


def test_the_users_token_settings_come_back_after_a_private_instance(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "the-clusters-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/somewhere/token")
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setattr(rr.ray, "shutdown", lambda: None)  # nothing is running: only the environment is at stake
    rr._use_private_token()
    first = os.environ["RAY_AUTH_TOKEN"]
    assert first != "the-clusters-token" and len(first) == 64 and os.environ["RAY_AUTH_MODE"] == "token"
    assert "RAY_AUTH_TOKEN_PATH" not in os.environ
    rr._use_private_token()  # a second instance before the stop: a new token, the originals still kept
    assert os.environ["RAY_AUTH_TOKEN"] not in (first, "the-clusters-token")
    rr.stop_ray()
    assert os.environ["RAY_AUTH_TOKEN"] == "the-clusters-token"
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == "/somewhere/token" and "RAY_AUTH_MODE" not in os.environ
    rr.stop_ray()  # a second stop changes nothing
    assert os.environ["RAY_AUTH_TOKEN"] == "the-clusters-token"
