"""`embargo demo`, the README's first command, start to finish."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_publishes_on_time_with_copies_first(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBARGO_")}
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--seconds", "3"],
                          cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "ms after the instant" in done.stdout
    public = tmp_path / "var" / "public"
    manifests = list(public.glob("*/manifest.json"))
    assert len(manifests) == 1
    manifest = json.loads(manifests[0].read_text())
    assert 0 <= manifest["lateness_ms"] < 1000
    names = sorted(d["name"] for d in manifest["documents"])
    assert names == ["eastwater.pdf", "kingsbridge.pdf", "national-report.pdf", "northmoor.pdf"]
    outbox = sorted(p.name.split(".")[1] for p in (tmp_path / "var" / "outbox").glob("*.eml"))
    assert outbox == ["copy"] * 3 + ["owner_summary"] + ["published"] * 3
    # A second run works too, beside the first.
    again = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--seconds", "2"],
                           cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)},
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert len(list(public.glob("*/manifest.json"))) == 2
