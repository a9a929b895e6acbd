"""Load the authors' GlimpsePrune checkpoints: ``config.json`` + ``new_modules_gp.pt``.

A checkpoint is a directory (or a Hugging Face hub repository, e.g.
``ashun989/GlimpsePrune_Qwen2.5-VL-7B-Instruct``, ``ashun989/GlimpsePrune_LLaVA-1.5-7B``) holding

* ``config.json``: the full base-model config saved by transformers plus the GlimpsePrune fields
  (model_type ``qwen2_5_vl_gp`` or ``llava_llama_gp``); the authors load it as the model's whole
  config (``load_new_modules``: ``config_class.from_json_file`` then ``_init_new_modules``);
* ``new_modules_gp.pt``: ``torch.save`` of ``{"attn_fuser": state_dict, "learnable_embeddings":
  tensor, "le_proj": state_dict, "le_norm": state_dict}`` (``save_new_modules``), loaded by the
  authors with ``load_state_dict(strict=True)`` per entry, as we do for the whole dict.

Every method setting comes from ``config.json``; our :class:`~vllm_glimpse.settings.GlimpseSettings`
knobs override the keep rule (threshold, max_ratio, min_keep, fixed_ratio) and K (layer), as the
authors' evaluation scripts override ``model.config.*`` after loading. Everything that does not
fit raises :class:`~vllm_glimpse.settings.PruningSettingsError` with the path and the reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vllm_glimpse.glimpse.config import LLAVA, QWEN, GlimpseConfig
from vllm_glimpse.glimpse.keep_rule import KeepRule
from vllm_glimpse.glimpse.modules import GlimpsePredictor
from vllm_glimpse.settings import GlimpseSettings, PruningSettingsError

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "HUB_IDS",
    "GlimpseCheckpoint",
    "resolve_checkpoint_dir",
    "parse_glimpse_config",
    "read_glimpse_config",
    "read_checkpoint_tensors",
    "expected_shapes",
    "load_glimpse_checkpoint",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "new_modules_gp.pt"
_FILES = f"{CONFIG_NAME} and {WEIGHTS_NAME}"

#: The authors' released checkpoints (README "Models" table), by base model.
HUB_IDS = {
    "Qwen/Qwen2.5-VL-3B-Instruct": "ashun989/GlimpsePrune_Qwen2.5-VL-3B-Instruct",
    "Qwen/Qwen2.5-VL-7B-Instruct": "ashun989/GlimpsePrune_Qwen2.5-VL-7B-Instruct",
    "liuhaotian/llava-v1.5-7b": "ashun989/GlimpsePrune_LLaVA-1.5-7B",
    "liuhaotian/llava-v1.5-13b": "ashun989/GlimpsePrune_LLaVA-1.5-13B",
}

#: checkpoint model_type -> (family, base model_types it can sit on)
_MODEL_TYPES = {
    "qwen2_5_vl_gp": (QWEN, ("qwen2_5_vl",)),
    "llava_llama_gp": (LLAVA, ("llava",)),
}

# Defaults of the authors' config classes, used for fields a config.json lacks (older saves lack
# the later ones, e.g. fixed_remain_ratio, attn_fuse_use_flash_attn).
# qwen: transformers_gp/models/qwen2_5_vl/configuration.py Qwen2_5_VL_GPConfig.__init__
_QWEN_DEFAULTS: dict[str, Any] = dict(
    selected_layers=(), use_attention_logits=False, attn_fuse_size=256, selected_visual_layers=(8,),
    visual_cond_size=256, attn_fuse_type="AttnFuserV1", attn_fuse_num_heads=4,
    attn_fuse_hidden_act="silu", attn_fuse_global=False, attn_fuse_use_flash_attn=False,
    ori_attn_supervision=True, deep_supervision=True, le_layers=(0,), le_length=1,
    le_norm_type="rmsnorm", reduce_threshold=0.5, use_ref_masks=False, use_zero_masks=False,
    reduce_layer=1000, anchor_positions=(), min_remain_num=1, max_remain_ratio=None,
    fixed_remain_ratio=None,
)
# llava: llava_gp/model/language_model/llava_llama.py LlavaConfig_GP.__init__ (no window mode:
# the VIP always attends over the whole image; le_norm is always RMSNorm; no FA2 VIP).
_LLAVA_DEFAULTS: dict[str, Any] = dict(
    selected_layers=(21,), use_attention_logits=False, attn_fuse_size=256,
    selected_visual_layers=(23, 17, 11, 5), visual_cond_size=256, attn_fuse_type="AttnFuserV1",
    attn_fuse_num_heads=4, attn_fuse_hidden_act="silu", ori_attn_supervision=True,
    deep_supervision=True, le_layers=(0,), le_length=1, reduce_threshold=0.5, use_ref_masks=False,
    use_zero_masks=False, reduce_layer=21, anchor_positions=(), min_remain_num=1,
    max_remain_ratio=None, fixed_remain_ratio=None,
)
_LLAVA_FIXED = dict(attn_fuse_global=True, le_norm_type="rmsnorm", attn_fuse_use_flash_attn=False)

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9_.\-]+$")


def _err(source: str, message: str) -> PruningSettingsError:
    return PruningSettingsError(f"GlimpsePrune checkpoint {source}: {message}")


# --------------------------------------------------------------------------------------------
# Locating the checkpoint
# --------------------------------------------------------------------------------------------


def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub is a dependency
        return False


def _hub_cache(cache_dir: str | os.PathLike | None) -> str:
    if cache_dir is not None:
        return str(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover
        return "the Hugging Face cache"


def _download(repo_id: str, revision: str | None, cache_dir) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = _offline()
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=[CONFIG_NAME, WEIGHTS_NAME],
            local_files_only=offline,
        )
    except LocalEntryNotFoundError as e:
        if offline:
            raise _err(
                repr(repo_id),
                f"no such local directory, and as a hub id it is not in the local Hugging Face "
                f"cache ({_hub_cache(cache_dir)}) while HF_HUB_OFFLINE is set, so it cannot be "
                f"downloaded; download it first "
                f"(`huggingface-cli download {repo_id} {CONFIG_NAME} {WEIGHTS_NAME}`) or give "
                f"a local directory holding {_FILES}",
            ) from e
        raise _err(repr(repo_id), f"no such local directory, and cannot download it from the "
                                  f"Hugging Face hub: {e}") from e
    except Exception as e:
        raise _err(
            repr(repo_id),
            f"no such local directory, and cannot fetch it from the Hugging Face hub "
            f"({type(e).__name__}: {e}); give a hub id such "
            f"as {HUB_IDS['Qwen/Qwen2.5-VL-7B-Instruct']} or a local directory holding {_FILES}",
        ) from e
    return Path(path)


def resolve_checkpoint_dir(
    path_or_hub_id: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The local directory of a checkpoint: an existing directory as is, else an ``owner/name``
    hub id through ``huggingface_hub.snapshot_download`` (only the two files; from the cache
    alone when ``HF_HUB_OFFLINE`` is set). Checks that both files are there."""
    text = os.fspath(path_or_hub_id)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise _err(text, f"is a file; a checkpoint is a directory holding {_FILES}")
        directory, source = path, str(path)
    elif _HUB_ID.match(text) and not text.startswith((".", "~")):
        directory, source = _download(text, revision, cache_dir), text
    else:
        raise _err(
            text,
            f"directory does not exist (expected a directory holding {_FILES}, or a Hugging Face "
            f"hub id such as {HUB_IDS['Qwen/Qwen2.5-VL-7B-Instruct']})",
        )
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (directory / name).is_file()]
    if missing:
        raise _err(
            source,
            f"{' and '.join(missing)} not found in {directory} (a GlimpsePrune checkpoint holds {_FILES})",
        )
    return directory


# --------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _base_text(base: Any) -> Any:
    """The LLM part of a base config (transformers 5 nests it in ``text_config``)."""
    if not isinstance(base, Mapping) and hasattr(base, "get_text_config"):
        try:
            return base.get_text_config()
        except Exception:
            pass
    sub = _get(base, "text_config")
    return sub if sub is not None else base


def _ckpt_text(cfg: Mapping[str, Any], name: str) -> Any:
    """A text-model field of the checkpoint config: top level (transformers 4.x Qwen2.5-VL and
    LLaVA saves) or ``text_config`` (newer saves)."""
    if name in cfg:
        return cfg[name]
    text = cfg.get("text_config")
    return text.get(name) if isinstance(text, Mapping) else None


class _Fields:
    """Typed reads of config.json fields with the family's defaults."""

    def __init__(self, cfg: Mapping[str, Any], defaults: Mapping[str, Any], source: str) -> None:
        self.cfg, self.defaults, self.source = cfg, defaults, source

    def raw(self, name: str) -> Any:
        return self.cfg[name] if name in self.cfg else self.defaults.get(name)

    def bad(self, name: str, what: str, value: Any) -> PruningSettingsError:
        return _err(self.source, f"{CONFIG_NAME} field {name!r} must be {what}, got {value!r}")

    def int(self, name: str) -> int:
        v = self.raw(name)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.bad(name, "an integer", v)
        return v

    def opt_int(self, name: str) -> int | None:
        return None if self.raw(name) is None else self.int(name)

    def float(self, name: str) -> float:
        v = self.raw(name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.bad(name, "a number", v)
        return float(v)

    def opt_float(self, name: str) -> float | None:
        return None if self.raw(name) is None else self.float(name)

    def bool(self, name: str) -> bool:
        v = self.raw(name)
        if not isinstance(v, bool):
            raise self.bad(name, "true or false", v)
        return v

    def str(self, name: str) -> str:
        v = self.raw(name)
        if not isinstance(v, str):
            raise self.bad(name, "a string", v)
        return v

    def ints(self, name: str) -> tuple[int, ...]:
        v = self.raw(name)
        if isinstance(v, int) and not isinstance(v, bool):
            v = [v]
        if not isinstance(v, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, int) for x in v):
            raise self.bad(name, "a list of integers", v)
        return tuple(v)

    def strs(self, name: str) -> tuple[str, ...]:
        v = self.raw(name)
        if v is None:
            return ()
        if not isinstance(v, (list, tuple)) or any(not isinstance(x, str) for x in v):
            raise self.bad(name, "a list of strings", v)
        return tuple(v)


def _check_base(cfg: Mapping[str, Any], family: str, base: Any, source: str) -> dict[str, Any]:
    """Base-model sizes, checked against the checkpoint's; returns them."""
    base_type = _get(base, "model_type")
    ckpt_type = cfg.get("model_type")
    allowed = _MODEL_TYPES[ckpt_type][1]
    if base_type is not None and base_type not in allowed:
        raise _err(source, f"was made for a {'/'.join(allowed)} base model (model_type {ckpt_type!r}), "
                           f"but this model's model_type is {base_type!r}")
    text = _base_text(base)
    sizes: dict[str, Any] = {}
    differ = []
    for name in ("hidden_size", "num_attention_heads", "num_hidden_layers"):
        want, have = _ckpt_text(cfg, name), _get(text, name)
        if have is None and want is None:
            raise _err(source, f"neither the base config nor {CONFIG_NAME} gives {name}")
        if have is not None and want is not None and int(want) != int(have):
            differ.append(f"{name} {want} in the checkpoint vs {have} in this model")
        sizes[name] = int(have if have is not None else want)
    if differ:
        raise _err(source, "was made for another base model: " + "; ".join(differ))

    eps = _ckpt_text(cfg, "rms_norm_eps")
    if eps is None:
        eps = _get(text, "rms_norm_eps", 1e-6)
    sizes["rms_norm_eps"] = float(eps)

    base_vision = _get(base, "vision_config")
    have = _get(base_vision, "hidden_size")
    ckpt_vision = cfg.get("vision_config") if isinstance(cfg.get("vision_config"), Mapping) else {}
    want = ckpt_vision.get("hidden_size")
    if family != QWEN:
        want = cfg.get("mm_hidden_size", want)
    if have is None and want is None:
        raise _err(source, f"neither the base config nor {CONFIG_NAME} gives the vision tower's hidden size")
    if have is not None and want is not None and int(have) != int(want):
        raise _err(source, f"was made for another base model: vision hidden size {want} in the "
                           f"checkpoint vs {have} in this model")
    sizes["vision_hidden_size"] = int(have if have is not None else want)
    # number of ViT layers, to check selected_visual_layers
    if family == QWEN:
        sizes["_vision_layers"] = _get(base_vision, "depth", ckpt_vision.get("depth"))
    else:
        sizes["_vision_layers"] = _get(base_vision, "num_hidden_layers", ckpt_vision.get("num_hidden_layers"))
    return sizes


def parse_glimpse_config(
    cfg: Mapping[str, Any],
    base_config: Any,
    settings: GlimpseSettings | None = None,
    *,
    source: str = CONFIG_NAME,
) -> GlimpseConfig:
    """Resolve a checkpoint's config.json (parsed) against the base model and our knobs."""
    if not isinstance(cfg, Mapping):
        raise _err(source, f"{CONFIG_NAME} must hold a JSON object")
    model_type = cfg.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise _err(source, f"{CONFIG_NAME} has model_type {model_type!r}; a GlimpsePrune checkpoint "
                           f"has model_type {' or '.join(map(repr, _MODEL_TYPES))}")
    family = _MODEL_TYPES[model_type][0]
    sizes = _check_base(cfg, family, base_config, source)
    vision_layers = sizes.pop("_vision_layers")

    f = _Fields(cfg, _QWEN_DEFAULTS if family == QWEN else _LLAVA_DEFAULTS, source)
    for name in ("use_ref_masks", "use_zero_masks"):
        if f.bool(name):
            raise _err(source, f"{CONFIG_NAME} sets {name}: true, a research mode (reference / "
                               "zero masks instead of the VIP) that vllm-glimpse does not run")
    values: dict[str, Any] = dict(
        family=family,
        selected_layers=f.ints("selected_layers"),
        reduce_layer=f.int("reduce_layer"),
        selected_visual_layers=f.ints("selected_visual_layers"),
        le_layers=f.ints("le_layers"),
        le_length=f.int("le_length"),
        use_attention_logits=f.bool("use_attention_logits"),
        attn_fuse_type=f.str("attn_fuse_type"),
        attn_fuse_size=f.int("attn_fuse_size"),
        visual_cond_size=f.int("visual_cond_size"),
        attn_fuse_num_heads=f.int("attn_fuse_num_heads"),
        attn_fuse_hidden_act=f.str("attn_fuse_hidden_act"),
        deep_supervision=f.bool("deep_supervision"),
        ori_attn_supervision=f.bool("ori_attn_supervision"),
        reduce_threshold=f.float("reduce_threshold"),
        max_remain_ratio=f.opt_float("max_remain_ratio"),
        min_remain_num=f.opt_int("min_remain_num"),
        fixed_remain_ratio=f.opt_float("fixed_remain_ratio"),
        anchor_positions=f.strs("anchor_positions"),
        source=source,
        **sizes,
    )
    if family == QWEN:
        values.update(
            attn_fuse_global=f.bool("attn_fuse_global"),
            le_norm_type=f.str("le_norm_type"),
            attn_fuse_use_flash_attn=f.bool("attn_fuse_use_flash_attn"),
        )
    else:
        values.update(_LLAVA_FIXED)

    if vision_layers is not None:
        top = int(vision_layers) - (1 if family == QWEN else 0)
        bad = [v for v in values["selected_visual_layers"] if not 0 <= v <= top]
        if bad:
            what = f"ViT blocks 0..{top}" if family == QWEN else f"CLIP hidden states 0..{top}"
            raise _err(source, f"selected_visual_layers {list(values['selected_visual_layers'])} "
                               f"name layers {bad} outside this model's vision tower ({what})")

    if settings is not None:
        values.update(_overrides(settings, values, source))
    return GlimpseConfig(**values)


def _overrides(s: GlimpseSettings, values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Our knobs over config.json. The threshold-mode knobs (threshold, max_ratio) switch off a
    checkpoint's fixed_remain_ratio; fixed_ratio takes precedence over the threshold mode
    (authors' ``_apply_token_constraints``), so giving it with max_ratio or threshold is an error."""
    out: dict[str, Any] = {}
    if s.fixed_ratio is not None and (s.max_ratio is not None or s.threshold is not None):
        given = [k for k in ("threshold", "max_ratio") if getattr(s, k) is not None]
        raise _err(source, f"fixed_ratio keeps exactly int(fixed_ratio * N) tokens, so it cannot be "
                           f"combined with {' or '.join(given)}")
    if s.threshold is not None:
        out["reduce_threshold"] = s.threshold
    if s.max_ratio is not None:
        out["max_remain_ratio"] = s.max_ratio
    if s.threshold is not None or s.max_ratio is not None:
        out["fixed_remain_ratio"] = None
    if s.min_keep is not None:
        out["min_remain_num"] = s.min_keep
    if s.fixed_ratio is not None:
        out["fixed_remain_ratio"] = s.fixed_ratio
    if s.layer is not None:
        out["reduce_layer"] = s.layer
    return out


def request_keep_rule(config: GlimpseConfig, overrides: GlimpseSettings) -> KeepRule:
    """The keep rule of a request that sets its own knobs (``mm_processor_kwargs``
    ``glimpse_threshold``, ...) over the engine's resolved config, with the same precedence as
    the engine's knobs over config.json."""
    return dataclasses.replace(config, **_overrides(overrides, {}, "request")).keep_rule


def read_glimpse_config(
    path_or_hub_id: str | os.PathLike,
    base_config: Any,
    settings: GlimpseSettings | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> GlimpseConfig:
    """The resolved config alone (no weights read)."""
    directory = resolve_checkpoint_dir(path_or_hub_id, revision=revision, cache_dir=cache_dir)
    return _read_config(directory, base_config, settings, os.fspath(path_or_hub_id))


def _read_config(directory: Path, base_config, settings, source: str) -> GlimpseConfig:
    path = directory / CONFIG_NAME
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _err(source, f"cannot read {path}: {e}") from e
    return parse_glimpse_config(cfg, base_config, settings, source=source)


# --------------------------------------------------------------------------------------------
# new_modules_gp.pt
# --------------------------------------------------------------------------------------------


def read_checkpoint_tensors(path: str | os.PathLike, source: str | None = None) -> dict[str, torch.Tensor]:
    """``new_modules_gp.pt`` flattened to ``{"attn_fuser.layers.0.norm1.weight": ..., ...}``."""
    path = Path(path)
    source = source or str(path.parent)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _err(source, f"cannot read {path}: {type(e).__name__}: {e}") from e
    if not isinstance(raw, Mapping):
        raise _err(source, f"{path.name} holds a {type(raw).__name__}, expected a dict of state dicts")
    flat: dict[str, torch.Tensor] = {}
    for top, value in raw.items():
        if isinstance(value, torch.Tensor):
            flat[str(top)] = value
        elif isinstance(value, Mapping):
            for key, tensor in value.items():
                if not isinstance(tensor, torch.Tensor):
                    raise _err(source, f"{path.name} entry {top}.{key} is a "
                                       f"{type(tensor).__name__}, not a tensor")
                flat[f"{top}.{key}"] = tensor
        else:
            raise _err(source, f"{path.name} entry {top!r} is a {type(value).__name__}, expected a "
                               "tensor or a state dict")
    return flat


def expected_shapes(config: GlimpseConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape for a config (the modules built on the meta device)."""
    with torch.device("meta"):
        module = GlimpsePredictor(config)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _names(items: list[str], limit: int = 5) -> str:
    head = ", ".join(items[:limit])
    return head + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _check_tensors(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]],
                   source: str, config: GlimpseConfig) -> None:
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [f"{k} {list(tensors[k].shape)} (expected {list(shape)})"
             for k, shape in expected.items() if k in tensors and tuple(tensors[k].shape) != shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_names(wrong)}")
    if problems:
        raise _err(
            source,
            f"{WEIGHTS_NAME} does not match its {CONFIG_NAME} ({config.attn_fuse_type}, "
            f"{config.num_vip_blocks} VIP blocks, hidden size {config.hidden_size}): "
            + "; ".join(problems),
        )


@dataclass
class GlimpseCheckpoint:
    config: GlimpseConfig
    predictor: GlimpsePredictor
    directory: Path


def load_glimpse_checkpoint(
    path_or_hub_id: str | os.PathLike,
    base_config: Any,
    settings: GlimpseSettings | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> GlimpseCheckpoint:
    """Read, check and load a checkpoint for ``base_config`` (a HF config object or dict).

    ``dtype`` defaults to the checkpoint's. The predictor is built in float32 and then moved to
    ``dtype``, buffers included, as the authors do (``_init_new_modules(re_init=True)``), which
    matters for the VIP's rotary table in bf16/fp16. Returned in eval mode.
    """
    source = os.fspath(path_or_hub_id)
    directory = resolve_checkpoint_dir(path_or_hub_id, revision=revision, cache_dir=cache_dir)
    config = _read_config(directory, base_config, settings, source)
    tensors = read_checkpoint_tensors(directory / WEIGHTS_NAME, source)
    _check_tensors(tensors, expected_shapes(config), source, config)
    if dtype is None:
        floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
        dtype = floats[0] if floats else torch.float32
    with torch.device(device):
        predictor = GlimpsePredictor(config)
    predictor.to(dtype=dtype)
    predictor.load_state_dict(tensors, strict=True)
    predictor.eval()
    return GlimpseCheckpoint(config=config, predictor=predictor, directory=directory)
