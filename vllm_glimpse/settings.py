"""Pruning settings: parsed and validated here, and nowhere else.

One :class:`PruningConfig` describes what the plugin does to a model: the method (``none``,
``visionzip``, ``glimpse``) and that method's knobs. It travels inside the HF config
(``hf_config.vllm_glimpse``, a plain dict) because that is the one object vLLM hands to both the
multimodal processor (front-end process) and the model (worker process); ``additional_config``
reaches only the model (docs/design.md §3).

How the config gets there: :func:`engine_kwargs` returns ``hf_overrides=PruningOverrides(...)``,
a picklable callable that vLLM applies to the HF config when it builds ``ModelConfig``. The
callable checks the model architecture, validates the knobs against the model (token counts,
layer counts), switches ``architectures`` to our variant of the model, and stores the settings.
Models that never see it run as vanilla vLLM.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Our log lines go through vLLM's ``vllm`` logger (its handlers and format, in every process).
LOGGER_NAME = "vllm.vllm_glimpse"
SETTINGS_ATTR = "vllm_glimpse"  # attribute of the HF config that carries PruningConfig.to_dict()

METHODS = ("none", "visionzip", "glimpse")


class PruningSettingsError(ValueError):
    """A pruning setting is unknown, out of range, or does not fit the model."""


# --------------------------------------------------------------------------------------------
# Supported models
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelVariant:
    """Our variant of one vLLM model architecture."""

    base_arch: str  # the architecture name in the checkpoint's config.json
    arch: str  # the name our variant is registered under
    qualname: str  # "module:Class", imported lazily by vLLM's registry
    methods: tuple[str, ...]  # pruning methods implemented for it
    display_name: str
    # method -> why it is not offered for this model (said when a user asks for it)
    unavailable_because: Mapping[str, str] = field(default_factory=dict)


VARIANTS: dict[str, ModelVariant] = {
    v.base_arch: v
    for v in (
        ModelVariant(
            "Qwen2_5_VLForConditionalGeneration",
            "PruningQwen2_5_VLForConditionalGeneration",
            "vllm_glimpse.models.qwen2_5_vl:PruningQwen2_5_VLForConditionalGeneration",
            ("none", "visionzip", "glimpse"),
            "Qwen2.5-VL",
        ),
        ModelVariant(
            "LlavaForConditionalGeneration",
            "PruningLlavaForConditionalGeneration",
            "vllm_glimpse.models.llava:PruningLlavaForConditionalGeneration",
            ("none", "visionzip", "glimpse"),
            "LLaVA-1.5",
        ),
        ModelVariant(
            "LlavaNextForConditionalGeneration",
            "VisionZipLlavaNextForConditionalGeneration",
            "vllm_glimpse.models.llava_next:VisionZipLlavaNextForConditionalGeneration",
            ("none", "visionzip"),
            "LLaVA-NeXT",
        ),
        ModelVariant(
            "Qwen3VLForConditionalGeneration",
            "VisionZipQwen3VLForConditionalGeneration",
            "vllm_glimpse.models.qwen3_vl:VisionZipQwen3VLForConditionalGeneration",
            ("none", "visionzip"),
            "Qwen3-VL",
            {"glimpse": "no GlimpsePrune checkpoint has been released for it"},
        ),
        ModelVariant(
            "Qwen3VLMoeForConditionalGeneration",
            "VisionZipQwen3VLMoeForConditionalGeneration",
            "vllm_glimpse.models.qwen3_vl:VisionZipQwen3VLMoeForConditionalGeneration",
            ("none", "visionzip"),
            "Qwen3-VL-MoE",
            {"glimpse": "no GlimpsePrune checkpoint has been released for it"},
        ),
        ModelVariant(
            "Qwen2VLForConditionalGeneration",
            "VisionZipQwen2VLForConditionalGeneration",
            "vllm_glimpse.models.qwen2_vl:VisionZipQwen2VLForConditionalGeneration",
            ("none", "visionzip"),
            "Qwen2-VL",
            {"glimpse": "no GlimpsePrune checkpoint has been released for it"},
        ),
    )
}
_VARIANT_BY_ARCH = {v.arch: v for v in VARIANTS.values()}


def variant_for(hf_config: Any) -> ModelVariant:
    """Our variant for a HF config, or a PruningSettingsError naming the architecture."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    for arch in archs:
        if arch in VARIANTS:
            return VARIANTS[arch]
        if arch in _VARIANT_BY_ARCH:  # overrides applied twice: already switched
            return _VARIANT_BY_ARCH[arch]
    supported = ", ".join(f"{v.base_arch} ({v.display_name})" for v in VARIANTS.values())
    raise PruningSettingsError(
        f"vllm-glimpse does not support model architecture {archs or '(none given)'}; "
        f"supported: {supported}"
    )


# --------------------------------------------------------------------------------------------
# Knobs
# --------------------------------------------------------------------------------------------


def _int_in(lo: int, hi: float = math.inf) -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PruningSettingsError(f"{name} must be an integer, got {value!r}")
        if not lo <= value <= hi:
            bound = f">= {lo}" if hi == math.inf else f"in [{lo}, {hi}]"
            raise PruningSettingsError(f"{name} must be {bound}, got {value}")
        return value

    return check


def _float_in(lo: float, hi: float, *, lo_open: bool = False) -> Callable[[str, Any], float]:
    def check(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PruningSettingsError(f"{name} must be a number, got {value!r}")
        value = float(value)
        ok = (lo < value if lo_open else lo <= value) and value <= hi
        if not ok or math.isnan(value):
            raise PruningSettingsError(
                f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}"
            )
        return value

    return check


def _str(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise PruningSettingsError(f"{name} must be a non-empty string, got {value!r}")
    return value


@dataclass(frozen=True)
class VisionZipSettings:
    """VisionZip (arXiv 2412.04467) budget.

    LLaVA-1.5/NeXT take counts per image (per crop for NeXT): ``dominant`` tokens counting the
    CLS token, plus ``contextual`` merged tokens; authors' splits 54+10, 108+20, 162+30.
    Qwen2.5-VL has no CLS and images of any size, so it takes ratios of the image's token count
    (authors' code defaults: 0.65 dominant, 0.05 contextual).
    """

    dominant: int | None = None
    contextual: int | None = None
    dominant_ratio: float | None = None
    contextual_ratio: float | None = None

    _CHECKS = {
        "dominant": _int_in(1),
        "contextual": _int_in(0),
        "dominant_ratio": _float_in(0.0, 1.0, lo_open=True),
        "contextual_ratio": _float_in(0.0, 1.0),
    }
    LLAVA_DEFAULTS = {"dominant": 54, "contextual": 10}
    QWEN_DEFAULTS = {"dominant_ratio": 0.65, "contextual_ratio": 0.05}


@dataclass(frozen=True)
class GlimpseSettings:
    """GlimpsePrune (arXiv 2508.01548) knobs; ``None`` means "as the checkpoint's config.json"."""

    checkpoint: str | None = None  # local directory or HF hub id
    threshold: float | None = None  # keep where sigmoid(logit) > threshold
    max_ratio: float | None = None  # max_remain_ratio: at most int(r * N) kept
    min_keep: int | None = None  # min_remain_num
    fixed_ratio: float | None = None  # fixed_remain_ratio: plain top-k
    layer: int | None = None  # K: prune after this (0-indexed) LLM layer

    _CHECKS = {
        "checkpoint": _str,
        "threshold": _float_in(0.0, 1.0),
        "max_ratio": _float_in(0.0, 1.0, lo_open=True),
        "min_keep": _int_in(1),
        "fixed_ratio": _float_in(0.0, 1.0, lo_open=True),
        "layer": _int_in(0),
    }


_KNOB_CLASSES: dict[str, type | None] = {
    "none": None,
    "visionzip": VisionZipSettings,
    "glimpse": GlimpseSettings,
}


def _knob_names(cls: type | None) -> list[str]:
    return [] if cls is None else [f.name for f in dataclasses.fields(cls)]


@dataclass(frozen=True)
class PruningConfig:
    method: str = "none"
    visionzip: VisionZipSettings | None = None
    glimpse: GlimpseSettings | None = None

    # ---- parsing -----------------------------------------------------------------------------

    @classmethod
    def parse(cls, method: str = "none", **knobs: Any) -> PruningConfig:
        """Parse user input. Knobs set to ``None`` count as not given."""
        if not isinstance(method, str) or method.lower() not in METHODS:
            raise PruningSettingsError(
                f"unknown pruning method {method!r}; choose one of: {', '.join(METHODS)}"
            )
        method = method.lower()
        knob_cls = _KNOB_CLASSES[method]
        valid = _knob_names(knob_cls)
        unknown = sorted(k for k in knobs if k not in valid)
        if unknown:
            where = f"valid: {', '.join(valid)}" if valid else "it takes none"
            raise PruningSettingsError(
                f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                f"for method {method!r} ({where})"
            )
        if knob_cls is None:
            return cls(method=method)
        checks = knob_cls._CHECKS
        values = {k: checks[k](k, v) for k, v in knobs.items() if v is not None}
        return cls(method=method, **{method: knob_cls(**values)})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> PruningConfig:
        if not data:
            return cls()
        data = dict(data)
        method = data.pop("method", "none")
        return cls.parse(method, **data)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        knobs = getattr(self, self.method, None) if self.method != "none" else None
        if knobs is not None:
            out.update({k: v for k, v in dataclasses.asdict(knobs).items() if v is not None})
        return out

    # ---- model-dependent checks ----------------------------------------------------------------

    def validate_for_model(self, hf_config: Any) -> ModelVariant:
        """Check that the model supports this config; return our variant of the model."""
        variant = variant_for(hf_config)
        if self.method not in variant.methods:
            reason = variant.unavailable_because.get(self.method)
            raise PruningSettingsError(
                f"pruning method {self.method!r} is not available for {variant.display_name} "
                f"({variant.base_arch})" + (f": {reason}" if reason else "")
                + f"; available: {', '.join(variant.methods)}"
            )
        if variant.base_arch.startswith("Llava"):
            vision_type = getattr(getattr(hf_config, "vision_config", None), "model_type", None)
            if vision_type != "clip_vision_model":
                raise PruningSettingsError(
                    f"vllm-glimpse supports LLaVA models with a CLIP vision tower; this model's "
                    f"vision tower is {vision_type!r}"
                )
        if self.method == "visionzip":
            self._validate_visionzip(variant, hf_config)
        if self.method == "glimpse":
            self._validate_glimpse(hf_config)
        return variant

    def _validate_glimpse(self, hf_config: Any) -> None:
        """The checkpoint must exist, be readable and fit this model; read now (config only,
        no weights) so that a bad path or a checkpoint for another model fails at startup."""
        knobs = self.glimpse or GlimpseSettings()
        if not knobs.checkpoint:
            raise PruningSettingsError(
                "glimpse needs a GlimpsePrune checkpoint: a local directory or HF hub id "
                "(checkpoint=..., --glimpse-checkpoint)"
            )
        from vllm_glimpse.glimpse.checkpoint import read_glimpse_config

        read_glimpse_config(knobs.checkpoint, hf_config, knobs)

    def _validate_visionzip(self, variant: ModelVariant, hf_config: Any) -> None:
        knobs = self.visionzip or VisionZipSettings()
        if variant.base_arch.startswith("Llava"):
            wrong = [k for k in ("dominant_ratio", "contextual_ratio") if getattr(knobs, k) is not None]
            if wrong:
                raise PruningSettingsError(
                    f"visionzip on {variant.display_name} takes token counts (dominant, "
                    f"contextual), not {', '.join(wrong)}"
                )
            if not isinstance(hf_config.vision_feature_layer, int):
                raise PruningSettingsError(
                    "visionzip needs a single vision_feature_layer; this model concatenates "
                    f"layers {hf_config.vision_feature_layer}"
                )
            dominant, contextual = visionzip_budget(hf_config, self)
            available = clip_num_tokens(hf_config)
            if dominant + contextual > available:
                raise PruningSettingsError(
                    f"visionzip dominant + contextual = {dominant} + {contextual} exceeds the "
                    f"{available} tokens (CLS included) the vision tower makes per image"
                )
        else:
            wrong = [k for k in ("dominant", "contextual") if getattr(knobs, k) is not None]
            if wrong:
                raise PruningSettingsError(
                    f"visionzip on {variant.display_name} takes ratios of each image's tokens "
                    f"(dominant_ratio, contextual_ratio), not {', '.join(wrong)}"
                )
            dominant_ratio, contextual_ratio = visionzip_ratios(hf_config, self)
            if dominant_ratio + contextual_ratio > 1.0:
                raise PruningSettingsError(
                    f"visionzip dominant_ratio + contextual_ratio = {dominant_ratio} + "
                    f"{contextual_ratio} exceeds 1 (they are shares of each image's tokens)"
                )


def clip_num_tokens(hf_config: Any) -> int:
    """Tokens the CLIP tower of a LLaVA model produces per image (or crop), CLS included."""
    vision = hf_config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 + 1


def visionzip_budget(hf_config: Any, config: PruningConfig | None = None) -> tuple[int, int] | None:
    """(dominant, contextual) per image (per crop on NeXT) for LLaVA models running VisionZip,
    else None."""
    config = pruning_config_of(hf_config) if config is None else config
    if config.method != "visionzip" or not variant_for(hf_config).base_arch.startswith("Llava"):
        return None
    knobs = config.visionzip or VisionZipSettings()
    defaults = VisionZipSettings.LLAVA_DEFAULTS
    dominant = knobs.dominant if knobs.dominant is not None else defaults["dominant"]
    contextual = knobs.contextual if knobs.contextual is not None else defaults["contextual"]
    return dominant, contextual


def visionzip_ratios(
    hf_config: Any, config: PruningConfig | None = None
) -> tuple[float, float] | None:
    """(dominant_ratio, contextual_ratio) for Qwen2.5-VL running VisionZip, else None."""
    config = pruning_config_of(hf_config) if config is None else config
    if config.method != "visionzip" or variant_for(hf_config).base_arch.startswith("Llava"):
        return None
    knobs = config.visionzip or VisionZipSettings()
    defaults = VisionZipSettings.QWEN_DEFAULTS
    dominant = knobs.dominant_ratio
    contextual = knobs.contextual_ratio
    return (
        defaults["dominant_ratio"] if dominant is None else dominant,
        defaults["contextual_ratio"] if contextual is None else contextual,
    )


def visionzip_counts(num_tokens: int, dominant_ratio: float, contextual_ratio: float) -> tuple[int, int]:
    """(dominant, contextual) token counts for an image of ``num_tokens`` tokens (Qwen2.5-VL).

    The authors' Qwen2.5-VL code keeps ``int(N * 0.65)`` dominant and
    ``max(int(N * 0.05), 1)`` contextual tokens (docs/design.md §2). Beyond their rule: a contextual
    ratio of 0 means no contextual token; D + C never exceeds N (C gives way); at least one token
    is kept.
    """
    dominant = int(num_tokens * dominant_ratio)
    contextual = max(int(num_tokens * contextual_ratio), 1) if contextual_ratio > 0 else 0
    contextual = min(contextual, num_tokens - dominant)
    if dominant + contextual == 0:
        dominant = 1
    return dominant, contextual


def pruning_config_of(hf_config: Any) -> PruningConfig:
    """The PruningConfig a model or processor runs with (method ``none`` when absent)."""
    return PruningConfig.from_dict(getattr(hf_config, SETTINGS_ATTR, None))


# Per-request settings: ``mm_processor_kwargs`` keys ``<method>_<knob>`` (e.g.
# ``visionzip_dominant``) override the engine's knobs for that request's images.
REQUEST_KNOB_PREFIXES = tuple(f"{m}_" for m in METHODS if m != "none")


def split_request_knobs(mm_kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(our per-request knobs, the other processor kwargs) of a request's mm_processor_kwargs."""
    ours = {k: v for k, v in mm_kwargs.items() if k.startswith(REQUEST_KNOB_PREFIXES)}
    return ours, {k: v for k, v in mm_kwargs.items() if k not in ours}


def request_config(hf_config: Any, mm_kwargs: Mapping[str, Any]) -> PruningConfig:
    """The settings one request runs with: the engine's, with the request's overrides applied
    and validated like the engine's own (PruningSettingsError naming the key otherwise)."""
    engine = pruning_config_of(hf_config)
    ours, _ = split_request_knobs(mm_kwargs)
    if not ours:
        return engine
    for key in ours:
        if not key.startswith(f"{engine.method}_"):
            raise PruningSettingsError(
                f"mm_processor_kwargs {key!r} does not apply: this engine runs pruning method "
                f"{engine.method!r}" + ("" if engine.method == "none" else
                                       f" (its per-request settings are {engine.method}_<knob>)")
            )
    if engine.method == "glimpse":
        return _glimpse_request_config(engine, ours)
    knobs = {k: v for k, v in engine.to_dict().items() if k != "method"}
    knobs.update({k[len(engine.method) + 1:]: v for k, v in ours.items()})
    try:
        config = PruningConfig.parse(engine.method, **knobs)
        config.validate_for_model(hf_config)
    except PruningSettingsError as error:
        message = rename_knobs(str(error), engine.method, lambda knob: f"{engine.method}_{knob}")
        raise PruningSettingsError(f"mm_processor_kwargs: {message}") from None
    return config


#: GlimpsePrune knobs a request may set (the keep rule); the checkpoint and K are engine-wide.
GLIMPSE_REQUEST_KNOBS = ("threshold", "max_ratio", "min_keep", "fixed_ratio")


def request_glimpse_overrides(mm_kwargs: Mapping[str, Any]) -> GlimpseSettings | None:
    """The keep-rule knobs a request sets itself (``glimpse_threshold``, ...), already validated
    by :func:`request_config`; None when it sets none. They apply over the engine's keep rule
    (``glimpse.checkpoint.request_keep_rule``)."""
    ours, _ = split_request_knobs(mm_kwargs)
    knobs = {k[len("glimpse_"):]: v for k, v in ours.items() if k.startswith("glimpse_")}
    if not knobs:
        return None
    return PruningConfig.parse("glimpse", **knobs).glimpse


def _glimpse_request_config(engine: PruningConfig, ours: Mapping[str, Any]) -> PruningConfig:
    """GlimpsePrune: a request may set its keep rule; the checkpoint and the layer K are the
    engine's (the model was built for them). Range checks as for the engine's knobs, and
    fixed_ratio cannot be combined with threshold or max_ratio (as on the command line). A
    threshold-mode knob replaces an engine-wide fixed ratio and vice versa
    (``glimpse.checkpoint.request_keep_rule``)."""
    knobs = {k[len("glimpse_"):]: v for k, v in ours.items()}
    may_set = ", ".join(f"glimpse_{k}" for k in GLIMPSE_REQUEST_KNOBS)
    engine_wide = sorted(k for k in knobs if k in ("checkpoint", "layer"))
    if engine_wide:
        raise PruningSettingsError(
            f"mm_processor_kwargs: glimpse_{engine_wide[0]} is an engine setting "
            f"(--glimpse-{engine_wide[0]}); a request may set {may_set}"
        )
    # Checked here, not by PruningConfig.parse: its list of valid knobs would name the two
    # engine-wide ones just refused above.
    unknown = sorted(f"glimpse_{k}" for k in knobs if k not in GLIMPSE_REQUEST_KNOBS)
    if unknown:
        raise PruningSettingsError(
            f"mm_processor_kwargs: unknown setting{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))} (a request may set {may_set})"
        )
    try:
        request = PruningConfig.parse("glimpse", **knobs).glimpse
    except PruningSettingsError as error:
        message = rename_knobs(str(error), "glimpse", lambda knob: f"glimpse_{knob}")
        raise PruningSettingsError(f"mm_processor_kwargs: {message}") from None
    threshold_mode = [k for k in ("threshold", "max_ratio") if getattr(request, k) is not None]
    if request.fixed_ratio is not None and threshold_mode:
        raise PruningSettingsError(
            f"mm_processor_kwargs: glimpse_fixed_ratio keeps exactly int(fixed_ratio * N) "
            f"tokens, so it cannot be combined with glimpse_{threshold_mode[0]}"
        )
    # The engine's settings stand: the request's knobs travel on their own
    # (request_glimpse_overrides) and the model applies them over the engine's resolved rule.
    return engine


def rename_knobs(message: str, method: str, name: Callable[[str], str]) -> str:
    """An error message worded for knobs, with each knob of ``method`` renamed by ``name`` (the
    command-line option, the request key)."""
    knob_cls = _KNOB_CLASSES.get(method)
    knobs = sorted(_knob_names(knob_cls), key=len, reverse=True)
    if not knobs:
        return message
    pattern = rf"(?<![\w-])({'|'.join(knobs)})(?![\w-])"
    return re.sub(pattern, lambda m: name(m.group(1)), message)


@dataclass(frozen=True)
class PruningOverrides:
    """``hf_overrides`` callable: validate against the model, switch to our variant, store.

    ``extra`` holds the user's own ``hf_overrides`` dict, applied first.
    """

    config: PruningConfig
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, hf_config: Any) -> Any:
        # vLLM 0.32 first calls an hf_overrides callable on a placeholder config
        # (architectures=[""], model_type="dummy_<type>") only to learn whether it changes
        # model_type (HFConfigParser.parse); we never do, so hand the placeholder back untouched.
        if list(getattr(hf_config, "architectures", None) or []) == [""]:
            return hf_config
        if self.extra:
            hf_config.update(dict(self.extra))
        variant = self.config.validate_for_model(hf_config)
        hf_config.architectures = [variant.arch]
        setattr(hf_config, SETTINGS_ATTR, self.config.to_dict())
        return hf_config


def engine_kwargs(
    method: str = "none", *, hf_overrides: Mapping[str, Any] | None = None, **knobs: Any
) -> dict[str, Any]:
    """Keyword arguments that make ``vllm.LLM`` / ``EngineArgs`` run with pruning.

    Example: ``LLM(model=..., **engine_kwargs(method="visionzip", dominant=54, contextual=10))``.
    Raises PruningSettingsError for an unknown method or knob or an out-of-range value; a model
    the method does not support is reported when the engine reads the model's config.
    """
    if hf_overrides is not None and not isinstance(hf_overrides, Mapping):
        raise PruningSettingsError(
            "engine_kwargs(hf_overrides=...) takes a dict; a callable cannot be combined"
        )
    config = PruningConfig.parse(method, **knobs)
    return {"hf_overrides": PruningOverrides(config, dict(hf_overrides or {}))}
