"""docs/METRICS.md is generated, not edited: scripts/metrics_doc.sh gives it from the records in docs/
and the analysis in docs/metrics_notes.md."""

import os
import subprocess
import sys

from conftest import REPO


def test_metrics_document_is_what_its_script_writes(tmp_path):
    out = tmp_path / "METRICS.md"
    run = subprocess.run(["bash", str(REPO / "scripts" / "metrics_doc.sh")], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OUT": str(out), "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    committed = (REPO / "docs" / "METRICS.md").read_text()
    assert out.read_text() == committed, "docs/METRICS.md differs from `bash scripts/metrics_doc.sh`: regenerate it"
