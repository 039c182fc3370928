"""The declared dependencies against what the package imports."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(*folders: str) -> set[str]:
    """Top-level names of every absolute import in the .py files under ``folders``, lazy ones too."""
    names: set[str] = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names


def _declared() -> dict[str, str]:
    """Normalised distribution name -> requirement string of ``[project] dependencies``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower().replace("_", "-"): r for r in project["dependencies"]}


def test_every_third_party_import_is_a_declared_dependency():
    third_party = _imported_modules("stage_dist", "tools") - set(sys.stdlib_module_names) - {"stage_dist"}
    distributions = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = {m: distributions.get(m) for m in third_party
               if not any(d.lower().replace("_", "-") in declared for d in distributions.get(m, [m]))}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    assert "google_crc32c" in third_party  # the shard index checksum (zarr_io), not only zarr's


def test_the_torch_bound_is_stated_alike_everywhere():
    bound = re.fullmatch(r"torch>=([\d.]+)", _declared()["torch"]).group(1)
    assert f"torch (>= {bound}:" in (ROOT / "README.md").read_text().replace("\n", " ")
    assert f"torch>={bound}" in (ROOT / "pyproject.toml").read_text()
    assert "recompile_limit" in (ROOT / "stage_dist" / "model" / "stage.py").read_text()  # the API that sets it (2.7)
