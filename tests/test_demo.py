"""The demo's table (``bash scripts/demo.sh``) reports what the engine did: on the tiny LLaVA-1.5
with VisionZip at the authors' 54 + 10 split, every image takes 64 of its 576 tokens, the prompt
shrinks by the difference, and each request holds the KV blocks of its pruned prompt."""

import pytest

from vllm_glimpse.demo import BLOCK_SIZE, run_demo
from vllm_glimpse.testing.workloads import mixed_batch


@pytest.mark.slow
def test_demo_table_counts_visionzip_on_llava(tiny_models, capsys):
    runs, table = run_demo(["--model", "llava", "--method", "visionzip", "--max-tokens", "2"])
    assert capsys.readouterr().out.rstrip().endswith(table)
    (run,) = runs
    assert run.method == "visionzip"
    for i, (spec, row) in enumerate(zip(mixed_batch(), run.rows)):
        images = len(spec.images)
        assert (row.image_tokens_before, row.image_tokens_after) == (576 * images, 64 * images), spec
        assert row.prompt_tokens_kept == row.prompt_tokens_sent - 512 * images, spec
        assert row.kv_blocks == -(-row.prompt_tokens_kept // BLOCK_SIZE), spec
        line = next(t for t in table.splitlines() if t.startswith(f"[{i}]"))
        assert (f"{576 * images} -> {64 * images}" in line
                and f"{row.prompt_tokens_sent} -> {row.prompt_tokens_kept}" in line), line
    assert "weights are random" in table


def test_warm_up_uses_other_images_of_the_same_sizes():
    """The demo charges one-time work to the engine's start with a warm-up request whose images
    have the batch's first image request's sizes but other pixels, so neither vLLM's caches nor
    the method's batch time see it."""
    from vllm_glimpse.demo import _warm_up_request

    specs = mixed_batch()
    first = next(s for s in specs if s.images)
    warm = _warm_up_request(specs)
    assert warm.text == first.text and len(warm.images) == len(first.images)
    for a, b in zip(warm.images, first.images):
        assert (a.width, a.height, a.kind) == (b.width, b.height, b.kind)
        assert a.build().tobytes() != b.build().tobytes()
    assert _warm_up_request([s for s in specs if not s.images]) is None
