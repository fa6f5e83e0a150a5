"""``bench load`` end to end on the shipped model (the tiny test model is not a folder app.py can serve):
one browser, two API clients, a real retrain (stopped with the server), the caps."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_load_reports_every_figure(tmp_path):
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, "-m", "abu_explorer", "bench", "load", "--browsers", "1", "--api-clients", "2", "--seconds", "15",
                           "--probe", "3", "--grace", "120", "--target-ratio", "1000", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == [] and report["caps_held"] and report["probe_rankings_equal"]
    assert "busy" in report["retrains"]["over_total"] and "per visitor" in report["retrains"]["over_own"]
    assert report["jobs"]["server_peak_rss_mb"] > 100
    lat = report["latency"]
    assert lat["idle"]["abu fast (probe)"]["n"] == 3 and "browser: attribute (all galleries)" in lat["load"]
