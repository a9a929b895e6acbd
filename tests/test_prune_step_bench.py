"""benchmarks/prune_step_bench.py runs on the CPU in its quick mode (both model shapes): the
prune step through the engine's own functions on vLLM's CPU attention cache, the moved K/V checked
against the originals; its measured memory is far below what the previous engine held, and below
the upper bound vLLM's memory profiling reserves for it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "prune_step_bench.py"


def test_quick_cpu_run(tmp_path):
    out = tmp_path / "prune.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick",
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["quick"]
    rows = {r["model"]: r for r in report["rows"]}
    assert set(rows) == {"qwen2.5-vl-7b", "llava-1.5-7b"}
    sys.path.insert(0, str(REPO / "benchmarks"))
    import prune_step_bench as bench
    from vllm_glimpse.engine.prune_step import prune_step_peak_bytes
    from vllm_glimpse.glimpse.modules import VIP_CHUNK_ROWS

    for name, row in rows.items():
        assert row["moved_kv_checked"], name
        assert 0 < row["kept_image_tokens"] <= row["requests"] * row["image_tokens"], name
        assert row["prune_step_ms"] > 0 and row["layers_0_k_ms"] > 0, name
        assert set(row["phases_ms"]) == {"logits", "vip", "keep", "move"}, name
        # The previous engine held q, k, v of every token of layers 0..K; now the glimpse queries
        # and the step's transient tensors, measured.
        assert row["after_bytes"] < row["before_bytes"] / 4, (name, row)
        # The goal: at most 10% of the KV the prompts occupy (held + transient peak).
        assert row["after_pct_of_prompt_kv"] <= 10, (name, row["after_pct_of_prompt_kv"])
        shape = bench.MODELS[name]
        cfg = type("Cfg", (), dict(attn_fuse_size=256, visual_cond_size=512, attn_fuse_num_heads=4,
                                   selected_layers=(shape.reduce_layer,),
                                   num_attention_heads=shape.heads,
                                   vision_hidden_size=shape.vision_hidden,
                                   reduce_layer=shape.reduce_layer))
        bound = prune_step_peak_bytes(row["tokens"], cfg, num_kv_heads=shape.kv_heads,
                                      head_size=shape.head_dim, elem_size=2, kv_recorded=False,
                                      row_chunk=VIP_CHUNK_ROWS)
        assert row["after_transient_peak_bytes"] <= bound, (name, row["after_transient_peak_bytes"], bound)
    assert "qwen2.5-vl-7b" in proc.stdout and "before %" in proc.stdout
