"""Every third-party distribution the server imports is listed in requirements.txt.

README's first command installs only requirements.txt: a module imported by the server but
installed only with the dev requirements (httpx once was) makes that command serve nothing.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER_MODULES = sorted(p.name for p in ROOT.glob("*.py"))


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_server_imports_are_in_requirements_txt():
    listed = {normalize(re.split(r"[<>=!~\[; ]", line.strip())[0])
              for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    local = {Path(m).stem for m in SERVER_MODULES}
    dists = packages_distributions()
    missing = set()
    for module in SERVER_MODULES:
        for node in ast.walk(ast.parse((ROOT / module).read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0
                     else [])
            for name in names:
                top = name.split(".")[0]
                if top in local or top in sys.stdlib_module_names or top == "__future__":
                    continue
                for dist in dists.get(top, [top]):
                    if normalize(dist) not in listed:
                        missing.add(f"{top} ({dist}) imported by {module}")
    assert not missing, f"not in requirements.txt: {sorted(missing)}"
