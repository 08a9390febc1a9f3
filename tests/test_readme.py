"""The README's examples, pasted alone, against a real server with the defaults a newcomer has
(`model` required): every Python block that makes a client and every curl block without a
placeholder runs as written (only the port changes) and gives a sensible answer on the
embedded model. The two install commands are in two code blocks (copying the first must not
run the test suite after Ctrl-C).
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import ROOT, Server

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python" and "openai.OpenAI(" in code]
# curl blocks that run as written: no placeholders, no files of the reader's, not another
# server's port (the replicas and upstream sections).
CURL = [code for lang, code in BLOCKS if lang == "bash" and "curl" in code
        and "localhost:8000" in code and "..." not in code and "$IMG" not in code
        and "resp_<id>" not in code]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("readme"), REQUIRE_MODEL="true").start()
    yield server
    server.stop()


def on(srv: Server, code: str) -> str:
    return (code.replace("127.0.0.1:8000", f"127.0.0.1:{srv.port}")
            .replace("localhost:8000", f"127.0.0.1:{srv.port}"))


def test_the_two_commands_are_two_blocks():
    first = [code for lang, code in BLOCKS if lang == "bash"][:2]
    assert first[0].strip().startswith("python3 -m venv .venv") and "uvicorn main:app" in first[0]
    assert "pytest" not in first[0] and len(first[0].strip().splitlines()) == 1
    assert "pip install -r requirements-dev.txt" in first[1] and "pytest" in first[1]
    # The CPU route is said before the first command, in a line one can copy.
    assert README.index("download.pytorch.org/whl/cpu") < README.index(first[0])


def test_there_are_examples_to_run():
    assert len(PYTHON) >= 3 and len(CURL) >= 3


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_example_runs_alone(srv, index):
    out = subprocess.run([sys.executable, "-c", on(srv, PYTHON[index])], capture_output=True,
                         text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    if "capital of France" in PYTHON[index]:
        assert "Paris" in text, text
    if "get_weather" in PYTHON[index]:
        assert "get_weather" in text and "Paris" in text, text
        assert len(text) < 2000, text  # a short, greedy answer, not 800 tokens of noise


@pytest.mark.parametrize("index", range(len(CURL)))
def test_curl_example_runs_alone(srv, index):
    out = subprocess.run(["bash", "-c", "set -e\n" + on(srv, CURL[index])], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"error"' not in out.stdout, out.stdout[-2000:]
    if "capital of France" in CURL[index]:
        assert "Paris" in out.stdout, out.stdout[-2000:]
