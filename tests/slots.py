"""The slot arithmetic of a compacted request, written out for the tests' expected values."""

from collections.abc import Sequence

import torch


def compacted_slots(block_ids: Sequence[int], num_kept: int, block_size: int) -> torch.Tensor:
    """Slots of positions 0..num_kept-1 of a request whose blocks are ``block_ids``."""
    j = torch.arange(num_kept, dtype=torch.int64)
    blocks = torch.as_tensor(list(block_ids), dtype=torch.int64)[j // block_size]
    return blocks * block_size + j % block_size
