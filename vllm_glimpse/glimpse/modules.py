"""GlimpsePrune's new modules in plain torch: the glimpse token and the VIP (``attn_fuser``).

Parameter names and shapes follow the authors' ``new_modules_gp.pt`` so that
:meth:`GlimpsePredictor.load_state_dict` takes the checkpoint with strict key matching (see
:mod:`vllm_glimpse.glimpse.checkpoint`). No vLLM imports: the same modules serve the engine and
the reference.

Sources (GitHub HVision-NKU/GlimpsePrune; "qwen" = transformers_gp/models/qwen2_5_vl/model_gp.py,
"llava" = llava_gp/model/language_model/llava_llama.py; transformers 4.51.3 for the Qwen helpers
the authors import):

* ``attn_fuser`` = ``AttnFuserV1`` (qwen/llava ``AttnFuserV1.__init__``):
  ``attn_in_proj`` Linear(len(selected_layers) * num_attention_heads -> attn_fuse_size, bias);
  per selected vision layer i: ``cond_in_projs.i`` Linear(vision hidden -> visual_cond_size,
  bias) and ``layers.i`` (``AttnFuserLayer``); ``attn_out_projs.i`` is Linear(attn_fuse_size -> 1)
  for the last block only (``nn.Identity``, no weights, for the others) unless
  ``deep_supervision``; at inference only the last block's projection is used
  (``AttnFuserV1.forward``: ``self.training or layer_num == len(self.layers) - 1``).
* ``AttnFuserLayer``: ``norm1``/``norm2`` RMSNorm with eps **1e-6** (hard-coded, not the LLM's
  eps); h = h + attn(norm1(h), cond); h = h + mlp(norm2(h)); ``mlp`` = gated MLP
  attn_fuse_size -> 2 * attn_fuse_size -> attn_fuse_size **with bias**:
  down(act(gate(x)) * up(x)).
* ``CondSdpaAttention``: q, k = Linear(fuse + cond -> fuse + cond, no bias) of
  ``cat([norm1(h), cond_in_projs.i(feat_i)])`` split into heads of (fuse + cond) / heads (192);
  v, o = Linear(fuse -> fuse, no bias) of norm1(h) alone, heads of fuse / heads (64); 2-D RoPE on
  q and k (``apply_rotary_pos_emb_vision``: rotate-half form, computed in float32, cast back);
  softmax attention with scale 1/sqrt(qk head dim), no mask inside an attention group; groups are
  whole images/frames (``attn_fuse_global``, both released Qwen configs; always for LLaVA) or the
  ViT's windows (``cu_window_seqlens // merge**2``, tokens in window order).
* ``CondFA2Attention`` (config ``attn_fuse_use_flash_attn``, added after the first release): pads
  v with ``visual_cond_size`` ones to the q/k width *before* the head split and keeps the first
  ``attn_fuse_size`` output channels, so head h's attention weights mix a different slice of v
  than in the SDPA layout; implemented here (``fa2_value_layout``) for fidelity.
* 2-D RoPE (qwen ``AttnFuserV1.rot_pos_emb``; ``Qwen2_5_VisionRotaryEmbedding(head_dim // 2)``,
  theta 10000): inv_freq = 1 / 10000^(arange(0, D, 2) / D) with D = qk_head_dim / 2 = 96;
  angles = [row * inv_freq, col * inv_freq] (rows and columns of the raster grid of merged
  tokens, row-major), duplicated to the full q/k head. ``inv_freq`` is a non-persistent buffer:
  the authors move the new modules to the LLM dtype after building them
  (``_init_new_modules(re_init=True)``: ``module.to(device=..., dtype=...)``), so in a bf16 model
  the angle table is computed in bf16; we keep it a buffer so ``.to(dtype)`` reproduces that.
* The VIP's output (one logit per image token) is put back into raster order
  (``reverse_indices = argsort(window_index)``).
* Glimpse token (qwen ``_init_new_modules``, ``_append_le``, ``_try_add_le``):
  ``learnable_embeddings`` [len(le_layers), le_length, hidden]; ``le_proj`` Linear(hidden, hidden,
  bias); ``le_norm`` RMSNorm(hidden, eps = the LLM's ``rms_norm_eps``) (or ``nn.LayerNorm`` when
  ``le_norm_type == "layernorm"``); embedding for layer l = le_norm(le_proj(E[le_layers.index(l)]))
  cast back to E's dtype (dropout is inactive at inference).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vllm_glimpse.glimpse.config import GlimpseConfig

__all__ = [
    "RMSNorm",
    "GatedMLP",
    "GridRotaryEmbedding",
    "ConditionalSelfAttention",
    "VIPBlock",
    "VisualImportancePredictor",
    "GlimpsePredictor",
    "grid_positions",
    "glimpse_attention_scores",
]

#: RMSNorm eps inside the VIP blocks (qwen/llava ``AttnFuserLayer.__init__``: eps=1e-6).
VIP_NORM_EPS = 1e-6
#: Frequency base of the VIP's 2-D RoPE (``Qwen2_5_VisionRotaryEmbedding`` default theta).
VIP_ROPE_THETA = 10000.0


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "quick_gelu": _quick_gelu,
}


class RMSNorm(nn.Module):
    """RMSNorm as transformers' Qwen2RMSNorm / LlamaRMSNorm: normalise in float32, cast back to
    the input dtype, then scale by ``weight``."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xf.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), all with bias (authors' ``MLP(..., bias=True)``)."""

    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=True)
        self.up_proj = nn.Linear(hidden, intermediate, bias=True)
        self.down_proj = nn.Linear(intermediate, hidden, bias=True)
        self._act = _ACTS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self._act(self.gate_proj(x)) * self.up_proj(x))


def grid_positions(grid_hw: Sequence[Sequence[int]] | torch.Tensor, device=None) -> torch.Tensor:
    """(row, col) of every merged token, images (frames) one after another, each row-major.

    ``grid_hw``: ``[n_images, 2]`` rows and columns in merged tokens (Qwen2.5-VL:
    ``image_grid_thw[:, 1:] // spatial_merge_size``, one entry per frame; LLaVA-1.5: (24, 24)).
    Returns ``[sum(h*w), 2]`` long.
    """
    # Built on the host and copied once (no per-image kernels, nothing waits for the device).
    out = []
    for h, w in (grid_hw.tolist() if isinstance(grid_hw, torch.Tensor) else grid_hw):
        h, w = int(h), int(w)
        rows = torch.arange(h).unsqueeze(1).expand(h, w).reshape(-1)
        cols = torch.arange(w).unsqueeze(0).expand(h, w).reshape(-1)
        out.append(torch.stack([rows, cols], dim=-1))
    if not out:
        return torch.zeros(0, 2, dtype=torch.long, device=device)
    return torch.cat(out, dim=0).to(device, non_blocking=True)


class GridRotaryEmbedding(nn.Module):
    """2-D rotary angles for the VIP (``Qwen2_5_VisionRotaryEmbedding(dim)`` + ``rot_pos_emb``)."""

    def __init__(self, dim: int, theta: float = VIP_ROPE_THETA) -> None:
        super().__init__()
        self.dim = dim
        # float32 on the CPU as the authors' code, then to the default device (a meta-device
        # arange would pull in sympy, seconds of import time).
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))
        self.register_buffer("inv_freq", inv_freq.to(torch.get_default_device()), persistent=False)

    def forward(self, positions: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """``positions [N, 2]`` (row, col) -> angles ``[N, 2 * len(inv_freq)]`` in inv_freq's dtype.
        ``size``: more than the largest position (read from ``positions`` when not given, which
        waits for the device)."""
        if positions.numel() == 0:
            return self.inv_freq.new_zeros(0, 2 * self.inv_freq.numel())
        if size is None:
            size = int(positions.max()) + 1
        seq = torch.arange(size, device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        table = torch.outer(seq, self.inv_freq)  # [size, dim/2]
        return table[positions.to(self.inv_freq.device)].flatten(1)

    def cos_sin(self, positions: torch.Tensor,
                size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) ``[N, qk_head_dim]``: the angles duplicated (``cat((rot, rot), -1)``)."""
        ang = self(positions, size)
        emb = torch.cat((ang, ang), dim=-1)
        return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


#: Rows per chunk of the VIP's row-wise work on the CPU (projections of q / k, the float32 RoPE,
#: the MLP): its temporaries stay bounded (a few hundred KB at the released widths) whatever the
#: batch's image tokens. On CUDA each runs in one pass: there the launch count matters, and the
#: prune step's transient tensors sit well below the MLP activations every decoder layer holds.
VIP_CHUNK_ROWS = 256


def _row_chunks(n: int, on_cuda: bool) -> list[slice]:
    step = max(n if on_cuda else VIP_CHUNK_ROWS, 1)
    return [slice(start, start + step) for start in range(0, n, step)]


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``apply_rotary_pos_emb_vision`` for one of q/k: ``x [N, heads, D]``,
    computed in float32 and cast back. Written half by half: with x = [x1, x2] and the halves
    of cos / sin equal (the angles are duplicated), ``x * cos + rotate_half(x) * sin`` is
    ``[x1 c - x2 s, x2 c + x1 s]``, the same float operations without rotate_half's copies.
    Elementwise, so the VIP computes it a chunk of rows at a time, in place
    (:func:`_rope_rows_`)."""
    out = x.clone()
    _rope_rows_(out, cos, sin)
    return out


def _rope_rows_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """``cos`` / ``sin`` as :meth:`GridRotaryEmbedding.cos_sin` gives them (halves equal), or
    only their first half (what the VIP keeps: the same values in half the memory)."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half].unsqueeze(-2).float(), sin[..., :half].unsqueeze(-2).float()
    # x1 must be a copy even in float32 (the first half is written before the second is
    # computed); x2 is read only before its half is written.
    x1, x2 = x[..., :half].to(torch.float32, copy=True), x[..., half:].float()
    # x1*c + (-x2)*s == x1*c - x2*s exactly (negation is exact in IEEE arithmetic)
    x[..., :half] = x1 * c - x2 * s
    x[..., half:] = x2 * c + x1 * s


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked softmax attention over ``[heads, N, d]`` tensors (through a batch of one)."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None])[0]


def _attend_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   seq_lens: Sequence[int]) -> torch.Tensor:
    """Attention inside each group of ``seq_lens`` consecutive tokens of ``[heads, N, d]``
    tensors in ONE call: the groups padded to the longest, padding keys masked out, padding rows
    dropped. What a GPU wants for a batch of images (one kernel, not one per image); the result
    equals the per-group loop up to the kernel's float rounding."""
    heads, n, _ = q.shape
    lens = torch.as_tensor(list(seq_lens)).to(q.device, non_blocking=True)
    groups, longest = lens.numel(), int(max(seq_lens))
    # output_size given: repeat_interleave need not read the lengths back from the device
    group = torch.repeat_interleave(torch.arange(groups, device=q.device), lens, output_size=n)
    starts = torch.cumsum(lens, 0) - lens
    slot = torch.arange(n, device=q.device) - starts[group]

    def pad(t):
        out = t.new_zeros(groups, longest, heads, t.shape[-1])
        out[group, slot] = t.transpose(0, 1)
        return out.transpose(1, 2)  # [groups, heads, longest, d]

    valid = torch.arange(longest, device=q.device)[None, :] < lens[:, None]  # [groups, longest]
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v),
                                         attn_mask=valid[:, None, None, :])
    return out.transpose(1, 2)[group, slot].transpose(0, 1)  # [heads, N, d]


def _attend_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: Sequence[int],
                   padded: bool) -> torch.Tensor:
    """Attention inside each group of ``seq_lens`` consecutive tokens of ``[heads, N, d]``
    tensors: one call, padded (``_attend_padded``), or one call per group."""
    if len(seq_lens) == 1:
        return _attend(q, k, v)
    if padded:
        return _attend_padded(q, k, v, seq_lens)
    out = q.new_empty(q.shape)
    start = 0
    for qs, ks, vs in zip(*(torch.split(t, list(seq_lens), dim=1) for t in (q, k, v))):
        out[:, start:start + qs.shape[1]] = _attend(qs, ks, vs)
        start += qs.shape[1]
    return out


class ConditionalSelfAttention(nn.Module):
    """The VIP's conditional self-attention (``CondSdpaAttention``; ``CondFA2Attention`` layout
    with ``fa2_value_layout``).

    Computed one head at a time, each head's q / k projected a chunk of rows at a time (on the
    CPU): what lives at once is the block's input and projected conditions, one head's q / k / v
    and attention output, and the output being assembled, not every head's q / k / v and their
    concatenated input. With the caller's hidden states that is about 4.5 KB per image token in
    bf16 at the released widths (was 9.3 KB), against 57 KB of KV per token on Qwen2.5-VL-7B
    (``benchmarks/prune_step_bench.py``). Head h's q / k are
    rows ``[h * d, (h + 1) * d)`` of the q / k projections (``d`` = qk width / heads), as the
    authors' ``view(n, heads, d)`` split; the values are those of the whole projection up to
    the matrix kernels' float rounding."""

    def __init__(self, hidden: int, cond: int, num_heads: int, fa2_value_layout: bool = False) -> None:
        super().__init__()
        qk = hidden + cond
        self.q_proj = nn.Linear(qk, qk, bias=False)
        self.k_proj = nn.Linear(qk, qk, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)
        self.num_heads = num_heads
        self.hidden = hidden
        self.cond = cond
        self.fa2_value_layout = bool(fa2_value_layout and cond > 0)
        # Several attention groups (images) in one call: padded into one attention call (None:
        # on CUDA, where one kernel for the batch beats one per image) or one call per group
        # (the CPU default, whose fused kernel takes no padding mask as cheaply).
        self.padded_groups: bool | None = None

    def value_columns(self, head: int) -> tuple[int, int]:
        """Columns ``[lo, hi)`` of ``v_proj``'s output (and of the attention output fed to
        ``o_proj``) that head ``head`` carries. SDPA layout: ``hidden / heads`` each. FA2 layout
        (``CondFA2Attention``): v is padded with ``cond`` ones to the q/k width before the head
        split and only the first ``hidden`` output channels are kept, so head h carries the v
        channels among ``[h * d, (h + 1) * d)`` below ``hidden`` (possibly none); the ones'
        outputs are dropped, so they need not be built."""
        width = (self.hidden + self.cond if self.fa2_value_layout else self.hidden) // self.num_heads
        lo = head * width
        return min(lo, self.hidden), min(lo + width, self.hidden)

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        seq_lens: Sequence[int],
    ) -> torch.Tensor:
        n = x.shape[0]
        d = self.q_proj.out_features // self.num_heads
        chunks = _row_chunks(n, x.is_cuda)
        padded = self.padded_groups if self.padded_groups is not None else x.is_cuda
        out = x.new_empty(n, self.hidden)
        for head in range(self.num_heads):
            lo, hi = self.value_columns(head)
            if lo == hi:
                continue  # FA2 layout: this head's outputs are all dropped
            w_q = self.q_proj.weight[head * d:(head + 1) * d]
            w_k = self.k_proj.weight[head * d:(head + 1) * d]
            q, k = x.new_empty(n, 1, d), x.new_empty(n, 1, d)
            for rows in chunks:
                qk_in = torch.cat([x[rows], cond[rows]], dim=-1) if cond is not None else x[rows]
                q[rows, 0] = F.linear(qk_in, w_q)
                k[rows, 0] = F.linear(qk_in, w_k)
                del qk_in
                _rope_rows_(q[rows], cos[rows], sin[rows])
                _rope_rows_(k[rows], cos[rows], sin[rows])
            # torch's fused CPU attention takes only 4-D inputs with v's head dim equal to q's;
            # else SDPA falls back to the math path, which materialises the [N, N] weights (about
            # 4x slower in bf16 at 1,521 tokens). Zero channels of v leave the first hi - lo
            # outputs as they were.
            v = F.pad(F.linear(x, self.v_proj.weight[lo:hi]), (0, d - (hi - lo)))
            head_out = _attend_groups(*(t.view(n, d)[None] for t in (q, k, v)), seq_lens, padded)
            del q, k, v  # (memory: the next head's are allocated next)
            out[:, lo:hi] = head_out[0, :, :hi - lo]
            del head_out
        return self.o_proj(out)


class VIPBlock(nn.Module):
    """``AttnFuserLayer``: pre-norm conditional attention and gated MLP, both residual."""

    def __init__(self, hidden: int, cond: int, num_heads: int, act: str,
                 fa2_value_layout: bool = False) -> None:
        super().__init__()
        self.norm1 = RMSNorm(hidden, VIP_NORM_EPS)
        self.norm2 = RMSNorm(hidden, VIP_NORM_EPS)
        self.attn = ConditionalSelfAttention(hidden, cond, num_heads, fa2_value_layout)
        self.mlp = GatedMLP(hidden, hidden * 2, act)

    def forward(self, h, cond, cos, sin, seq_lens):
        h = h + self.attn(self.norm1(h), cond, cos, sin, seq_lens)
        # Row-wise from here: on the CPU a chunk of rows at a time, so the MLP's three
        # intermediate tensors (twice the hidden width each) stay bounded.
        for rows in _row_chunks(h.shape[0], h.is_cuda):
            h[rows] += self.mlp(self.norm2(h[rows]))
        return h


class VisualImportancePredictor(nn.Module):
    """The VIP (``attn_fuser`` = AttnFuserV1): one logit per image token."""

    def __init__(self, config: GlimpseConfig) -> None:
        super().__init__()
        self.config = config
        fuse, cond = config.attn_fuse_size, config.visual_cond_size
        n_blocks = config.num_vip_blocks
        self.attn_in_proj = nn.Linear(config.vip_input_size, fuse)
        self.cond_in_projs = nn.ModuleList(
            nn.Linear(config.vision_hidden_size, cond) for _ in range(n_blocks)
        )
        self.layers = nn.ModuleList(
            VIPBlock(fuse, cond, config.attn_fuse_num_heads, config.attn_fuse_hidden_act,
                     config.attn_fuse_use_flash_attn)
            for _ in range(n_blocks)
        )
        self.attn_out_projs = nn.ModuleList(
            nn.Linear(fuse, 1) if (config.deep_supervision or i == n_blocks - 1) else nn.Identity()
            for i in range(n_blocks)
        )
        self.rotary = GridRotaryEmbedding(config.rotary_dim)

    @property
    def windowed(self) -> bool:
        """Whether attention runs inside the ViT's windows (Qwen with attn_fuse_global false)."""
        return self.config.family == "qwen2_5_vl" and not self.config.attn_fuse_global

    def forward(
        self,
        attn_logits: torch.Tensor,
        vision_feats: Sequence[torch.Tensor],
        grid_hw: Sequence[Sequence[int]] | torch.Tensor,
        window_index: torch.Tensor | None = None,
        window_seqlens: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """One logit per image token, ``[N]``, raster order.

        * ``attn_logits [N, len(selected_layers) * heads]``: the glimpse token's attention to each
          image token at the selected LLM layers, layer-major (``[N, layers, heads]`` flattened),
          raw logits or log-softmax as ``config.use_attention_logits`` says.
        * ``vision_feats``: one ``[N, vision_hidden]`` per ``config.selected_visual_layers``, same
          order (block i uses the i-th). Qwen: the ViT block output mean-pooled over each 2x2
          merge group; LLaVA: CLIP hidden states without CLS.
        * ``grid_hw``: rows, columns of each image / frame in merged tokens; images concatenated.
        * Windowed mode only (``attn_fuse_global`` false): ``window_index [N]`` lists, in window
          order, the raster index of each token (the ViT's ``get_window_index`` at merged-token
          granularity) and ``window_seqlens`` the window sizes in that order
          (``diff(cu_window_seqlens) // merge**2``). In global mode (all released checkpoints)
          attention covers whole images, which makes the result independent of token order:
          both are ignored and raster order is used.
        """
        cfg = self.config
        dtype = self.attn_in_proj.weight.dtype
        device = self.attn_in_proj.weight.device
        positions = grid_positions(grid_hw, device=device)
        n = positions.shape[0]
        if attn_logits.shape != (n, cfg.vip_input_size):
            raise ValueError(
                f"VIP attention input must be [{n}, {cfg.vip_input_size}] (image tokens, "
                f"selected layers x heads), got {list(attn_logits.shape)}"
            )
        if len(vision_feats) != cfg.num_vip_blocks:
            raise ValueError(
                f"VIP needs {cfg.num_vip_blocks} vision feature maps (layers "
                f"{list(cfg.selected_visual_layers)}), got {len(vision_feats)}"
            )
        for i, f in enumerate(vision_feats):
            if tuple(f.shape) != (n, cfg.vision_hidden_size):
                raise ValueError(
                    f"vision features of layer {cfg.selected_visual_layers[i]} must be "
                    f"[{n}, {cfg.vision_hidden_size}], got {list(f.shape)}"
                )
        if n == 0:
            return attn_logits.new_zeros(0, dtype=dtype)

        h = self.attn_in_proj(attn_logits.to(device=device, dtype=dtype))
        grids = grid_hw.tolist() if isinstance(grid_hw, torch.Tensor) else grid_hw
        # The angles' cos / sin without cos_sin's duplicated half: the RoPE reads only the first.
        angles = self.rotary(positions, max(max(int(a), int(b)) for a, b in grids))
        cos, sin = angles.cos(), angles.sin()
        del angles

        seq_lens = [int(a) * int(b) for a, b in
                    (grid_hw.tolist() if isinstance(grid_hw, torch.Tensor) else grid_hw)]
        if not self.windowed:
            window_index = None  # whole-image attention: token order does not matter
        else:
            if window_index is None or window_seqlens is None:
                raise ValueError(
                    "this checkpoint's VIP attends inside ViT windows (attn_fuse_global is false): "
                    "pass window_index and window_seqlens"
                )
            window_index = window_index.to(device=device, dtype=torch.long)
            if window_index.shape != (n,):
                raise ValueError(f"window_index must be [{n}], got {list(window_index.shape)}")
            seq_lens = [int(s) for s in window_seqlens]
            if sum(seq_lens) != n or min(seq_lens) <= 0:
                raise ValueError(f"window_seqlens {seq_lens} must be positive and add up to {n} tokens")
            h, cos, sin = h[window_index], cos[window_index], sin[window_index]

        for i, block in enumerate(self.layers):
            # One feature map at a time (a lazy sequence builds each only here): the caller's
            # features need not all be materialised at once.
            cond = self.cond_in_projs[i](vision_feats[i].to(device=device, dtype=dtype))
            if window_index is not None:
                cond = cond[window_index]  # (projected first: a narrower copy)
            h = block(h, cond, cos, sin, seq_lens)
            del cond
        out = self.attn_out_projs[-1](h).squeeze(-1)
        if window_index is not None:
            out = out[torch.argsort(window_index)]
        return out


class GlimpsePredictor(nn.Module):
    """All of GlimpsePrune's new weights: ``attn_fuser`` (the VIP) and the glimpse token
    (``learnable_embeddings``, ``le_proj``, ``le_norm``), named as in ``new_modules_gp.pt``."""

    def __init__(self, config: GlimpseConfig) -> None:
        super().__init__()
        self.config = config
        self.attn_fuser = VisualImportancePredictor(config)
        if config.has_glimpse_token:
            hidden = config.hidden_size
            self.learnable_embeddings = nn.Parameter(
                torch.empty(len(config.le_layers), config.le_length, hidden)
            )
            if not self.learnable_embeddings.is_meta:  # (normal_ on meta imports sympy: slow)
                nn.init.normal_(self.learnable_embeddings, 0.0, 0.02)  # authors' _init_weights
            self.le_proj = nn.Linear(hidden, hidden)
            if config.le_norm_type == "rmsnorm":
                self.le_norm = RMSNorm(hidden, config.rms_norm_eps)
            else:
                self.le_norm = nn.LayerNorm(hidden)

    @property
    def has_glimpse_token(self) -> bool:
        return self.config.has_glimpse_token

    def glimpse_embedding(self, layer: int) -> torch.Tensor | None:
        """``[le_length, hidden]`` for LLM layer ``layer``, or None when the layer gets none.

        Layer 0: the glimpse token's input embedding, appended after the last prompt token.
        Layer l > 0 in ``le_layers``: added to the glimpse token's hidden state before layer l.
        """
        if not self.has_glimpse_token or layer not in self.config.le_layers:
            return None
        e = self.learnable_embeddings[self.config.le_layers.index(layer)]
        return self.le_norm(self.le_proj(e)).to(e.dtype)

    def glimpse_embeddings(self) -> torch.Tensor | None:
        """``[len(le_layers), le_length, hidden]``: every layer's embedding, le_layers order."""
        if not self.has_glimpse_token:
            return None
        e = self.learnable_embeddings
        return self.le_norm(self.le_proj(e)).to(e.dtype)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """The VIP: see :meth:`VisualImportancePredictor.forward`."""
        return self.attn_fuser(*args, **kwargs)


def glimpse_attention_scores(
    query: torch.Tensor,
    keys: torch.Tensor,
    image_index: torch.Tensor,
    *,
    use_attention_logits: bool,
    scale: float | None = None,
) -> torch.Tensor:
    """The VIP's attention input for one sample at one selected LLM layer: ``[N_img, heads]``.

    ``query [heads, D]``: the glimpse token's post-RoPE query; ``keys [S, kv_heads, D]``: the
    post-RoPE keys of every token the glimpse token attends to (the whole prompt, padding
    excluded, and the glimpse token itself); ``image_index [N_img]``: rows of ``keys`` that are
    image tokens. Scores are ``q.k * scale`` (default 1/sqrt(D)), GQA keys repeated per head
    (transformers' ``repeat_kv``); with ``use_attention_logits`` false they become
    ``log_softmax`` over all S keys before the image columns are taken (qwen
    ``Qwen2_5_VLSdpaAttention_GP._cal_attn_weights``, llava
    ``LlamaFlashAttention2_GP._cal_attn_weights``). Several selected layers: concatenate the
    results along the last dim in ``selected_layers`` order.
    """
    heads, d = query.shape
    kv_heads = keys.shape[1]
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads do not split over {kv_heads} KV heads")
    # GQA: query head h reads KV head h // (heads / kv_heads), as repeat_kv; grouped here rather
    # than repeating the keys (a [S, heads, D] copy, 7x the keys on Qwen2.5-VL-7B).
    group = heads // kv_heads
    scores = torch.einsum("kgd,skd->kgs", query.view(kv_heads, group, d),
                          keys.to(query.dtype)).reshape(heads, -1)  # [heads, S]
    scores = scores / math.sqrt(d) if scale is None else scores * scale
    if not use_attention_logits:
        scores = torch.log_softmax(scores, dim=-1)
    return scores[:, image_index].transpose(0, 1)
