"""The store, ingest and window code never imports torch: the converter and the shard writer run
on machines without it, and the structure (not a comment) keeps it so."""

import subprocess
import sys
from pathlib import Path

TORCH_FREE = ("store", "schema", "zarr_io", "shard_format", "sources", "convert", "window")


def test_store_and_converter_modules_do_not_import_torch():
    imports = "; ".join(f"import stage_dist.{name}" for name in TORCH_FREE)
    probe = f"import sys; {imports}; print('torch' in sys.modules, stage_dist.__file__)"
    root = Path(__file__).resolve().parents[1]  # -c puts the working directory first on sys.path
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=root)
    torch_imported, package = result.stdout.split()
    assert Path(package).resolve().parent == root / "stage_dist"
    assert torch_imported == "False", f"importing {', '.join(TORCH_FREE)} imported torch"
