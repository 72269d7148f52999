from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import Unauthorized
from gateway.http.auth import TokenAuth
from gateway.settings import Settings, SettingsError


def test_from_env_casts_and_overrides_win() -> None:
    env = {
        "TURNOUT_MODEL_REPOSITORY": "/m",
        "TURNOUT_PORT": "9000",
        "TURNOUT_ADMIN_TOKENS": "alice=aaaaaaaa1, bob=bbbbbbbb2",
    }
    s = Settings.from_env(env, overrides={"TURNOUT_PORT": "9100"})
    assert s.model_repository == Path("/m")
    assert s.port == 9100
    assert dict(s.admin_tokens) == {"alice": "aaaaaaaa1", "bob": "bbbbbbbb2"}
    assert Settings.from_env(s.to_env()) == s
    assert s.monitors is True
    assert Settings.from_env(env | {"TURNOUT_MONITORS": "off"}).monitors is False
    periods = Settings.from_env(
        env | {"TURNOUT_GUARD_TICK_S": "0.05", "TURNOUT_LEASE_TTL_S": "0.5"}
    )
    assert (periods.guard_tick_s, periods.lease_ttl_s, periods.flush_s) == (0.05, 0.5, 0.2)
    assert Settings.from_env(periods.to_env()) == periods


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "TURNOUT_MODEL_REPOSITORY"),
        ({"TURNOUT_MODEL_REPOSITORY": "/m", "TURNOUT_PORT": "eighty"}, "TURNOUT_PORT"),
        ({"TURNOUT_MODEL_REPOSITORY": "/m", "TURNOUT_WORKERS": "0"}, "TURNOUT_WORKERS"),
        ({"TURNOUT_MODEL_REPOSITORY": "/m", "TURNOUT_FLUSH_S": "soon"}, "TURNOUT_FLUSH_S"),
        ({"TURNOUT_MODEL_REPOSITORY": "/m", "TURNOUT_PUBLISH_S": "0"}, "TURNOUT_PUBLISH_S"),
        (
            {
                "TURNOUT_MODEL_REPOSITORY": "/m",
                "TURNOUT_GUARD_TICK_S": "5",
                "TURNOUT_LEASE_TTL_S": "3",
            },
            "TURNOUT_LEASE_TTL_S",
        ),
        (
            {"TURNOUT_MODEL_REPOSITORY": "/m", "TURNOUT_GRAPH_OPTIMIZATION": "max"},
            "TURNOUT_GRAPH_OPTIMIZATION",
        ),
        (
            {"TURNOUT_MODEL_REPOSITORY": "/m", "TURNOUT_ADMIN_TOKENS": "alice"},
            "TURNOUT_ADMIN_TOKENS",
        ),
        (
            {"TURNOUT_MODEL_REPOSITORY": "/m", "TURNOUT_ADMIN_TOKENS": "a=short"},
            "TURNOUT_ADMIN_TOKENS",
        ),
    ],
    ids=[
        "missing-repo",
        "port-not-int",
        "zero-workers",
        "bad-flush",
        "zero-publish",
        "lease-shorter-than-tick",
        "bad-optimization",
        "token-no-value",
        "token-short",
    ],
)
def test_bad_settings_fail_loudly_with_the_variable_name(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)


def test_token_values_never_appear_in_errors() -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"TURNOUT_MODEL_REPOSITORY": "/m", "TURNOUT_ADMIN_TOKENS": "a=secret1"})
    assert "secret1" not in str(info.value)


def test_token_auth_returns_the_token_name() -> None:
    auth = TokenAuth({"alice": "aaaaaaaa1", "bob": "bbbbbbbb2"})
    assert auth.authenticate("Bearer bbbbbbbb2") == "bob"
    assert auth.authenticate("bearer aaaaaaaa1") == "alice"
    for header in [None, "", "Bearer", "Bearer nope", "Basic aaaaaaaa1", "Bearer aaaaaaaa1x"]:
        with pytest.raises(Unauthorized):
            auth.authenticate(header)
    with pytest.raises(Unauthorized, match="no admin tokens"):
        TokenAuth({}).authenticate("Bearer aaaaaaaa1")
