"""benchmarks/kernels_bench.py runs end to end on CPU (quick shapes): every kernel gets a row with
its timings, bytes and speedup, and every fast path matched its reference (the script exits
non-zero on a mismatch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "kernels_bench.py"

# Every launcher the benchmark must cover (written out here, not imported from the script, so that
# dropping a kernel from the script fails this test).
EXPECTED_KERNELS = {
    "attention_received_scores",
    "topk_keep_mask",
    "topk_indices",
    "contextual_merge",
    "glimpse_attention_logits",
    "keep_and_compact",
    "scatter_kv_to_slots",
}


def test_quick_cpu_run_reports_every_kernel(tmp_path):
    out = tmp_path / "kernels.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--repeats", "2",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    report = json.loads(out.read_text())

    assert report["device_type"] == "cpu" and report["fast_backend"] == "cpu"
    assert report["torch"] and report["mode"] == "quick" and report["repeats"] == 2
    rows = report["rows"]
    assert {row["kernel"] for row in rows} >= EXPECTED_KERNELS, sorted(r["kernel"] for r in rows)
    for row in rows:
        where = f"{row['kernel']} {row['shape_text']}"
        assert row["correct"] is True and row["check"], where
        assert row["backend"] == "cpu", where
        assert row["bytes"] > 0, where
        for path in ("fast", "ref"):
            timing = row[path]
            assert 0 < timing["min_ms"] <= timing["median_ms"] <= timing["max_ms"], (where, path)
            assert timing["gbps"] > 0, (where, path)
            assert timing["pct_peak"] is None, (where, path)  # no peak bandwidth for a CPU
        assert row["speedup"] > 0, where
        assert abs(row["speedup"] - row["ref"]["median_ms"] / row["fast"]["median_ms"]) < 1e-9, where
    # The table went to stdout with one line per path.
    assert all(kernel in proc.stdout for kernel in EXPECTED_KERNELS)
    assert "torch-ref" in proc.stdout
