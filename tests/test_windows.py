"""What can be checked of Windows on Linux: the server's modules use no POSIX-only API (no
fork, no POSIX-only signals, no fcntl; asyncio's add_signal_handler is missing on Windows'
event loop), and Windows paths in settings mean the same wherever the server runs.

Not checked here: a real Windows run (no Windows machine in CI); the README's Windows section
lists the commands.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(p for p in ROOT.glob("*.py"))

POSIX_ONLY_MODULES = {"fcntl", "pwd", "grp", "resource", "termios", "pty", "tty", "posix"}
POSIX_ONLY_ATTRIBUTES = {
    ("os", "fork"), ("os", "forkpty"), ("os", "setsid"), ("os", "getuid"), ("os", "geteuid"),
    ("os", "getgid"), ("os", "killpg"), ("os", "getpgid"), ("os", "setpgrp"), ("os", "chown"),
    ("os", "mkfifo"), ("os", "sysconf"), ("signal", "SIGKILL"), ("signal", "SIGHUP"),
    ("signal", "SIGUSR1"), ("signal", "SIGUSR2"), ("signal", "SIGALRM"), ("signal", "SIGQUIT"),
    ("signal", "alarm"), ("signal", "pause"), ("signal", "setitimer"), ("socket", "AF_UNIX"),
}


def posix_only_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names
                      if a.name.split(".")[0] in POSIX_ONLY_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in \
                POSIX_ONLY_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and (node.value.id, node.attr) in \
                    POSIX_ONLY_ATTRIBUTES:
                found.append(f"{node.value.id}.{node.attr}")
            elif node.attr == "add_signal_handler":
                found.append("loop.add_signal_handler")
        elif isinstance(node, ast.keyword) and node.arg in ("preexec_fn", "start_new_session"):
            found.append(f"{node.arg}=")
    return [f"{path.name}:{use}" for use in found]


def test_the_server_uses_no_posix_only_api():
    assert MODULES, "no server modules found"
    uses = [u for p in MODULES for u in posix_only_uses(p)]
    assert uses == [], f"POSIX-only calls break `uvicorn main:app` on Windows: {uses}"


def test_the_scan_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import fcntl\nimport os, signal\nos.fork()\nsignal.SIGKILL\n"
                   "loop.add_signal_handler(2, f)\nsubprocess.Popen([], preexec_fn=f)\n")
    assert len(posix_only_uses(bad)) == 5


@pytest.mark.parametrize("source, name", [
    (r"C:\models\Qwen3-VL-2B-Instruct", "Qwen3-VL-2B-Instruct"),
    ("C:/models/Qwen3-VL-2B-Instruct/", "Qwen3-VL-2B-Instruct"),
    (r"\\server\share\SmolLM2", "SmolLM2"),
    (r".\models\mine", "mine"),
    ("/srv/models/mine", "mine"),
    ("Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-2B-Instruct"),
])
def test_a_local_model_path_is_served_under_its_last_part_on_any_os(monkeypatch, source, name):
    model = importlib.import_module("model")
    monkeypatch.setattr(model.settings, "model_repo_id", source)
    monkeypatch.setattr(model.settings, "served_model_name", "")
    assert model.served_model_name() == name
    monkeypatch.setattr(model.settings, "served_model_name", "my-model")
    assert model.served_model_name() == "my-model"
