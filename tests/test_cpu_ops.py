"""The C++ CPU op (csrc/, built with ninja by torch's extension loader) against the torch
reference it stands in for."""

import pytest
import torch

from vllm_glimpse.cpu_ops import cpu_ops
from vllm_glimpse.visionzip import segment_mean_merge, segment_mean_merge_reference


@pytest.fixture(scope="module")
def ops():
    return cpu_ops(required=True)  # fails the test if the op cannot be built here


@pytest.mark.parametrize("num_members, num_targets, hidden",
                         [(523, 10, 128), (5, 8, 64), (0, 3, 16), (1, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contextual_merge_matches_reference(ops, num_members, num_targets, hidden, dtype):
    gen = torch.Generator().manual_seed(num_members + hidden)
    members = torch.randn(num_members, hidden, generator=gen).to(dtype)
    targets = torch.randn(num_targets, hidden, generator=gen).to(dtype)
    # Leave target 0 without members when possible: it must come back unchanged.
    low = 1 if num_targets > 1 else 0
    assignment = torch.randint(low, num_targets, (num_members,), generator=gen)
    got = ops.contextual_merge(members, assignment, targets)
    want = segment_mean_merge_reference(targets, members, assignment)
    assert got.dtype == dtype and got.shape == (num_targets, hidden)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if num_targets > 1:
        assert torch.equal(got[0], targets[0])
    torch.testing.assert_close(segment_mean_merge(targets, members, assignment), want,
                               rtol=1e-5, atol=1e-5)


def test_contextual_merge_rejects_bad_assignment(ops):
    with pytest.raises(RuntimeError, match=r"assignment\[1\] = 7 is outside \[0, 3\)"):
        ops.contextual_merge(torch.zeros(2, 4), torch.tensor([0, 7]), torch.zeros(3, 4))


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_load(ops):
    """torch's loader waits forever on its ``lock`` file; a build killed mid-way leaves one."""
    import subprocess
    import sys

    from vllm_glimpse.cpu_ops import _build_dir, _csrc_dir

    (_build_dir(_csrc_dir()) / "lock").write_text("")
    code = ("from vllm_glimpse.cpu_ops import cpu_ops; "
            "print(cpu_ops(required=True).contextual_merge.__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "contextual_merge" in proc.stdout
