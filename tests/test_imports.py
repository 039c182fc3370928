"""The layers' import rules hold by structure, not by comment.

- ``core``, ``store`` and ``ingest`` (and the ``convert``/``synth`` commands) never import torch: the
  converter and the shard writer run on machines without it.
- Imports point one way: commands -> engine -> model/data/ava -> ingest/store -> core.
"""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stage_dist"
TORCH_FREE_PACKAGES = ("core", "store", "ingest")
TORCH_FREE_COMMANDS = ("convert", "synth")
# What each layer may import from stage_dist (besides itself); commands (top-level modules) import anything.
MAY_IMPORT = {
    "core": set(),
    "store": {"core"},
    "ingest": {"core", "store", "ava"},  # the converter reads AVA label maps
    "data": {"core", "store"},
    "model": {"core", "store", "data"},
    "ava": {"core", "store"},
    "engine": {"core", "store", "data", "model", "ava"},
}


def _modules(package: str) -> list[str]:
    return sorted(f"stage_dist.{package}.{m.name}" for m in pkgutil.iter_modules([str(PACKAGE / package)]))


def test_store_ingest_and_core_never_import_torch():
    names = [name for package in TORCH_FREE_PACKAGES for name in _modules(package)]
    names += [f"stage_dist.{command}" for command in TORCH_FREE_COMMANDS]
    imports = "; ".join(f"import {name}" for name in names)
    probe = f"import sys; {imports}; print('torch' in sys.modules, stage_dist.__file__)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    torch_imported, package = result.stdout.split()
    assert Path(package).resolve().parent == PACKAGE
    assert len(names) > 15 and torch_imported == "False", f"importing {', '.join(names)} imported torch"


def _stage_dist_imports(path: Path) -> set[str]:
    """The stage_dist modules ``path`` imports, at any depth (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "stage_dist":
                found |= {f"stage_dist.{alias.name}" for alias in node.names  # modules, not __version__
                          if (PACKAGE / alias.name).is_dir() or (PACKAGE / f"{alias.name}.py").exists()}
            elif node.module.startswith("stage_dist."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("stage_dist.")}
    return found


def _layer(module: str) -> str | None:
    """The subpackage of ``stage_dist.X.Y`` (None for a top-level command module)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (PACKAGE / parts[-1]).is_dir() else None


def test_imports_point_one_way_and_form_no_circle():
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[module] = _stage_dist_imports(path) - {module}
    assert set(MAY_IMPORT) == {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    wrong = [f"{module} imports {target}" for module, targets in graph.items() for target in targets
             if (layer := _layer(module)) is not None and _layer(target) not in MAY_IMPORT[layer] | {layer}]
    assert not wrong, wrong

    def circle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    circles = [circle for module in graph if (circle := circle_from(module))]
    assert not circles, circles[0]
