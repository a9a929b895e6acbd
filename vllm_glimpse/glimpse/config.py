"""The resolved GlimpsePrune configuration of one checkpoint on one base model.

:class:`GlimpseConfig` holds every number the new modules and the method need: the base-model
sizes the modules depend on, the glimpse-token and VIP architecture, and the pruning settings
(K, keep rule). It is built by :func:`vllm_glimpse.glimpse.checkpoint.parse_glimpse_config` from
a checkpoint's ``config.json`` plus our :class:`~vllm_glimpse.settings.GlimpseSettings` overrides,
and validated here (``PruningSettingsError`` for anything that does not fit).

Sources (GitHub HVision-NKU/GlimpsePrune; "qwen" = transformers_gp/models/qwen2_5_vl/, "llava" =
llava_gp/model/language_model/llava_llama.py):

* field names and defaults: qwen ``configuration.py`` ``Qwen2_5_VL_GPConfig.__init__`` and llava
  ``LlavaConfig_GP.__init__``;
* released values: ``train_configs/{qwen2_5_3b_gp,qwen2_5_7b_gp,llava1_5_7b_gp,llava1_5_13b_gp}/*.yaml``
  (K = ``selected_layers`` = ``reduce_layer`` = 23 / 18 / 21 / 26; ``attn_fuse_size`` 256,
  ``visual_cond_size`` 512, ``attn_fuse_num_heads`` 4, ``silu``, ``deep_supervision`` false,
  ``ori_attn_supervision`` false; Qwen: ``use_attention_logits`` true, ``attn_fuse_global``
  true, ``selected_visual_layers`` [31, 23, 15, 7]; LLaVA: ``use_attention_logits`` false,
  ``selected_visual_layers`` [23, 17, 11, 5]; ``le_layers`` = every LLM layer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm_glimpse.glimpse.keep_rule import ANCHOR_NAMES, KeepRule
from vllm_glimpse.settings import PruningSettingsError

#: Model families: the value of ``GlimpseConfig.family``.
QWEN = "qwen2_5_vl"
LLAVA = "llava"

#: VIP variants we implement. The authors also register AttnFuserDummy (no weights, normalised
#: mean attention), AttnFuserV2 (no vision conditions) and, later, AttnFuserMLP; no released
#: checkpoint uses them.
SUPPORTED_FUSERS = ("AttnFuserV1",)

#: Activations the VIP MLP accepts (the authors look ``attn_fuse_hidden_act`` up in
#: transformers' ACT2FN; released checkpoints use ``silu``).
SUPPORTED_ACTS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu", "quick_gelu")


def _err(source: str, message: str) -> PruningSettingsError:
    return PruningSettingsError(f"GlimpsePrune checkpoint {source}: {message}")


@dataclass(frozen=True)
class GlimpseConfig:
    """Everything GlimpsePrune needs for one base model. Layer indices are 0-indexed.

    ``selected_visual_layers`` are, for Qwen2.5-VL, ViT *block* indices (the output of block i,
    qwen ``_visual_forward``) and, for LLaVA, indices into CLIP's ``hidden_states`` tuple, where
    0 is the embedding output and i the output of encoder layer i-1 (llava ``encode_images``:
    ``hidden_states[i][:, 1:]``, CLS dropped). The i-th VIP block is conditioned on the i-th
    listed layer.
    """

    family: str  # QWEN or LLAVA
    # ---- base model (from the base config; the checkpoint must agree) ----
    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    vision_hidden_size: int
    rms_norm_eps: float
    # ---- which layers ----
    selected_layers: tuple[int, ...]  # LLM layers whose glimpse attention feeds the VIP
    reduce_layer: int  # K: prune after this LLM layer
    selected_visual_layers: tuple[int, ...]
    # ---- glimpse token ----
    le_layers: tuple[int, ...] = ()  # layers that get the (additive) glimpse embedding
    le_length: int = 1
    le_norm_type: str = "rmsnorm"  # "rmsnorm" (eps = rms_norm_eps) or "layernorm"
    # ---- VIP ----
    use_attention_logits: bool = False  # raw q.k/sqrt(d) (True) or log_softmax over all keys
    attn_fuse_type: str = "AttnFuserV1"
    attn_fuse_size: int = 256
    visual_cond_size: int = 512
    attn_fuse_num_heads: int = 4
    attn_fuse_hidden_act: str = "silu"
    attn_fuse_global: bool = True  # VIP attends over a whole image (else over ViT windows)
    attn_fuse_use_flash_attn: bool = False  # the authors' FA2 VIP: a different value-head layout
    deep_supervision: bool = False  # output projections after every VIP block (only the last is used)
    ori_attn_supervision: bool = False  # training/diagnostics only; no weights, no effect on the keep mask
    # ---- keep rule ----
    reduce_threshold: float = 0.5
    max_remain_ratio: float | None = None
    min_remain_num: int | None = 1
    fixed_remain_ratio: float | None = None
    anchor_positions: tuple[str, ...] = ()
    # ---- provenance ----
    source: str = field(default="<config>", compare=False)

    def __post_init__(self) -> None:
        src = self.source
        if self.family not in (QWEN, LLAVA):
            raise _err(src, f"unknown model family {self.family!r}")
        if self.attn_fuse_type not in SUPPORTED_FUSERS:
            raise _err(
                src,
                f"attn_fuse_type {self.attn_fuse_type!r} is not supported (supported: "
                f"{', '.join(SUPPORTED_FUSERS)})",
            )
        if self.attn_fuse_hidden_act not in SUPPORTED_ACTS:
            raise _err(src, f"attn_fuse_hidden_act {self.attn_fuse_hidden_act!r} is not supported "
                            f"(supported: {', '.join(SUPPORTED_ACTS)})")
        if self.le_norm_type not in ("rmsnorm", "layernorm"):
            raise _err(src, f"le_norm_type must be 'rmsnorm' or 'layernorm', got {self.le_norm_type!r}")
        for name in ("attn_fuse_size", "visual_cond_size", "attn_fuse_num_heads"):
            if getattr(self, name) <= 0:
                raise _err(src, f"{name} must be positive, got {getattr(self, name)}")
        if (self.attn_fuse_size + self.visual_cond_size) % self.attn_fuse_num_heads:
            raise _err(src, f"attn_fuse_size + visual_cond_size = {self.attn_fuse_size} + "
                            f"{self.visual_cond_size} is not divisible by attn_fuse_num_heads "
                            f"{self.attn_fuse_num_heads}")
        if self.attn_fuse_size % self.attn_fuse_num_heads:
            raise _err(src, f"attn_fuse_size {self.attn_fuse_size} is not divisible by "
                            f"attn_fuse_num_heads {self.attn_fuse_num_heads}")
        if self.qk_head_dim % 4:
            raise _err(src, f"the VIP's q/k head dim {self.qk_head_dim} must be a multiple of 4 "
                            "(2-D rotary embedding over rows and columns)")
        L = self.num_hidden_layers
        if not self.selected_layers:
            raise _err(src, "selected_layers is empty: the VIP needs the glimpse attention of at "
                            "least one LLM layer")
        if not self.selected_visual_layers:
            raise _err(src, "selected_visual_layers is empty: AttnFuserV1 has one block per "
                            "selected vision layer")
        for name in ("selected_layers", "le_layers"):
            values = getattr(self, name)
            bad = [v for v in values if not 0 <= v < L]
            if bad:
                raise _err(src, f"{name} {list(values)} has layers outside this {L}-layer model: {bad}")
            if len(set(values)) != len(values):
                raise _err(src, f"{name} {list(values)} lists a layer twice")
        if not 0 <= self.reduce_layer < L:
            raise _err(src, f"pruning layer K = {self.reduce_layer} (reduce_layer) is not a layer of "
                            f"this {L}-layer model (0..{L - 1})")
        if self.reduce_layer < max(self.selected_layers):
            raise _err(src, f"pruning layer K = {self.reduce_layer} comes before layer "
                            f"{max(self.selected_layers)}, whose glimpse attention the VIP reads "
                            f"(selected_layers {list(self.selected_layers)}); K must be >= "
                            f"{max(self.selected_layers)}")
        if self.has_glimpse_token and 0 not in self.le_layers:
            raise _err(src, f"le_layers {list(self.le_layers)} must contain layer 0 (the glimpse "
                            "token enters the sequence at layer 0)")
        if self.le_length < 0:
            raise _err(src, f"le_length must be >= 0, got {self.le_length}")
        if self.family == LLAVA and self.le_norm_type != "rmsnorm":
            raise _err(src, "LLaVA checkpoints always use an RMSNorm le_norm")
        if not 0.0 <= self.reduce_threshold <= 1.0:
            raise _err(src, f"reduce_threshold must be in [0, 1], got {self.reduce_threshold}")
        for name in ("max_remain_ratio", "fixed_remain_ratio"):
            v = getattr(self, name)
            if v is not None and not 0.0 < v <= 1.0:
                raise _err(src, f"{name} must be in (0, 1] or null, got {v}")
        if self.min_remain_num is not None and self.min_remain_num < 0:
            raise _err(src, f"min_remain_num must be >= 0 or null, got {self.min_remain_num}")
        bad = [a for a in self.anchor_positions if a not in ANCHOR_NAMES]
        if bad:
            raise _err(src, f"unknown anchor_positions {bad} (supported: {', '.join(ANCHOR_NAMES)})")

    # ---- derived sizes ------------------------------------------------------------------------

    @property
    def vip_input_size(self) -> int:
        """Input width of ``attn_in_proj``: len(selected_layers) x num_attention_heads.

        qwen ``AttnFuserV1.__init__``. (LLaVA's AttnFuserV1 uses num_attention_heads alone,
        identical for its single selected layer.)"""
        return len(self.selected_layers) * self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        """(attn_fuse_size + visual_cond_size) / heads: 768 / 4 = 192 for the released models."""
        return (self.attn_fuse_size + self.visual_cond_size) // self.attn_fuse_num_heads

    @property
    def v_head_dim(self) -> int:
        """attn_fuse_size / heads: 256 / 4 = 64 (SDPA layout)."""
        return self.attn_fuse_size // self.attn_fuse_num_heads

    @property
    def rotary_dim(self) -> int:
        """The ``dim`` the authors give Qwen2_5_VisionRotaryEmbedding: qk_head_dim // 2 (96).

        It yields rotary_dim / 2 frequencies (48) per axis; row and column angles are
        concatenated (96) and duplicated, so the whole q/k head (192) is rotated."""
        return self.qk_head_dim // 2

    @property
    def num_vip_blocks(self) -> int:
        return len(self.selected_visual_layers)

    @property
    def has_glimpse_token(self) -> bool:
        """Whether the checkpoint has the learnable glimpse token (qwen ``_init_new_modules``:
        only when le_layers is non-empty and le_length > 0; LLaVA always)."""
        return len(self.le_layers) > 0 and self.le_length > 0

    @property
    def keep_rule(self) -> KeepRule:
        return KeepRule(
            threshold=self.reduce_threshold,
            max_remain_ratio=self.max_remain_ratio,
            min_remain_num=self.min_remain_num,
            fixed_remain_ratio=self.fixed_remain_ratio,
            anchor_positions=self.anchor_positions,
        )
