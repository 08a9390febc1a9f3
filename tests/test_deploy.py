"""The deployment files say what the README says they do (the image itself is built by the
GitHub workflow: no Docker daemon in this CI)."""

from __future__ import annotations

import fnmatch
import re

import yaml

from conftest import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    """The arguments of every `name` instruction, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in text.splitlines()
            if line.strip().upper().startswith(name + " ")]


def test_the_image_runs_as_a_user_with_its_data_in_a_volume():
    assert instructions("USER") and instructions("USER")[-1] not in ("root", "0")
    assert instructions("VOLUME") == ['["/data"]']
    env = " ".join(instructions("ENV"))
    for setting in ("SESSIONS_DB_PATH=/data/", "HF_HOME=/data/", "XDG_CACHE_HOME=/data/"):
        assert setting in env
    assert "/health" in instructions("HEALTHCHECK")[0]
    assert instructions("CMD") == ['["uvicorn", "main:app", "--host", "0.0.0.0", "--port", "8000"]']
    assert instructions("FROM") == ["${BASE_IMAGE}"] and "nvidia/cuda:" in DOCKERFILE


def test_every_server_file_reaches_the_image():
    """COPY takes the top-level modules and the page; .dockerignore lets them through."""
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]

    def included(name: str) -> bool:
        keep = True
        for pattern in ignore:  # the last matching pattern wins, as in Docker
            negate = pattern.startswith("!")
            if fnmatch.fnmatch(name, pattern.lstrip("!")):
                keep = negate
        return keep

    copied = " ".join(instructions("COPY"))
    for path in [*ROOT.glob("*.py"), ROOT / "playground.html", ROOT / "requirements.txt"]:
        assert included(path.name), f"{path.name} is left out by .dockerignore"
        assert path.name in copied or f"*{path.suffix}" in copied, f"{path.name} is not copied"
    assert not included("tests") and not included(".venv") and not included("data")


def test_compose_and_the_workflow():
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    server = compose["services"]["resumable"]
    assert server["build"] == "." and "data:/data" in server["volumes"]
    assert server["ports"] == ["127.0.0.1:8000:8000"]  # not every interface by default
    assert compose["services"]["resumable-cpu"]["profiles"] == ["cpu"]
    workflow = yaml.safe_load((ROOT / ".github/workflows/ci.yml").read_text())
    steps = [step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"]]
    assert any("bash .ci/run" in run for run in steps)  # the README's test command
    assert any(run.startswith("docker build") for run in steps)
