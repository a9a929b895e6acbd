"""``vllm serve <model> --plugin visionzip|glimpse|none [--visionzip-... | --glimpse-...]``.

vLLM has no ``--plugin`` flag. Our flags are added to vLLM's engine arguments by
:func:`vllm_glimpse.patches.add_plugin_cli_flags` (vLLM loads general plugins right before it
builds its engine-argument parser), and turned into the same ``hf_overrides`` that
``vllm_glimpse.engine_kwargs(...)`` gives ``LLM(...)``: each flag is a knob of
:mod:`vllm_glimpse.settings`, which does all the validation.

Bad settings stop the command before any engine starts, with one line naming the problem
(:class:`StartupError`, a ``SystemExit``), also when the model does not support the method:
the model's HF config is read and checked here first, where it can be.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from vllm_glimpse.settings import METHODS, PruningSettingsError, engine_kwargs, rename_knobs

GROUP_TITLE = "vllm-glimpse"  # `vllm serve --help=vllm-glimpse` shows the group


@dataclass(frozen=True)
class Flag:
    method: str
    knob: str
    type: type
    help: str

    @property
    def option(self) -> str:
        return f"--{self.method}-{self.knob.replace('_', '-')}"

    @property
    def dest(self) -> str:
        return f"vllm_glimpse_{self.method}_{self.knob}"


FLAGS = (
    Flag("visionzip", "dominant", int,
         "LLaVA: dominant tokens per image (per crop on NeXT), CLS counted; 54 when not given"),
    Flag("visionzip", "contextual", int,
         "LLaVA: merged contextual tokens per image / crop; 10 when not given"),
    Flag("visionzip", "dominant_ratio", float,
         "Qwen2.5-VL: dominant tokens as a fraction of each image's tokens; 0.65 when not given"),
    Flag("visionzip", "contextual_ratio", float,
         "Qwen2.5-VL: contextual tokens as a fraction of each image's tokens; 0.05 when not given"),
    Flag("glimpse", "checkpoint", str, "local directory or HF hub id of the GlimpsePrune modules"),
    Flag("glimpse", "threshold", float, "keep image tokens with sigmoid(logit) > T"),
    Flag("glimpse", "max_ratio", float, "keep at most int(R * N) image tokens per sample"),
    Flag("glimpse", "min_keep", int, "keep at least this many image tokens per sample"),
    Flag("glimpse", "fixed_ratio", float, "keep the top int(R * N) image tokens (no threshold)"),
    Flag("glimpse", "layer", int, "prune after this 0-indexed LLM layer (K)"),
)


class StartupError(SystemExit):
    """Bad pruning settings on the command line: the process prints this one line to stderr
    and exits with status 1."""

    def __init__(self, message: str) -> None:
        super().__init__(f"vllm-glimpse: error: {message}")


def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add our options, as one group, to a vLLM engine-argument parser."""
    group = parser.add_argument_group(
        GROUP_TITLE,
        "Prune visual tokens with VisionZip or GlimpsePrune. Same settings as "
        "LLM(..., **vllm_glimpse.engine_kwargs(method, **knobs)).",
    )
    group.add_argument(
        "--plugin", dest="vllm_glimpse_plugin", choices=[m for m in METHODS], default=None,
        help="pruning method: visionzip, glimpse, or none (our model variant, no pruning)")
    for flag in FLAGS:
        group.add_argument(flag.option, dest=flag.dest, type=flag.type, default=None,
                           metavar=flag.knob.upper(), help=flag.help)
    return parser


def engine_kwargs_from_cli(args: argparse.Namespace) -> dict[str, Any] | None:
    """``engine_kwargs(...)`` for the parsed command line, or None without ``--plugin``.
    Raises :class:`StartupError` for bad settings."""
    method = getattr(args, "vllm_glimpse_plugin", None)
    given = [f for f in FLAGS if getattr(args, f.dest, None) is not None]
    if method is None:
        if given:
            raise StartupError(f"{given[0].option} needs --plugin {given[0].method}")
        return None
    foreign = [f for f in given if f.method != method]
    if foreign:
        raise StartupError(f"{foreign[0].option} does not apply to --plugin {method}")
    knobs = {f.knob: getattr(args, f.dest) for f in given}
    user_overrides = getattr(args, "hf_overrides", None)
    try:
        kwargs = engine_kwargs(method, hf_overrides=user_overrides or None, **knobs)
    except PruningSettingsError as error:
        raise StartupError(_as_flags(str(error), method)) from None
    if method == "glimpse":
        _refuse_glimpse_conflicts(args)
    _check_model_early(args, kwargs["hf_overrides"], method)
    return kwargs


# Engine flags GlimpsePrune cannot run with (vllm_glimpse/engine/engine_config.py says why);
# vLLM leaves each at None unless the user gave it.
GLIMPSE_CONFLICTS = (
    ("async_scheduling", "--async-scheduling"),
)


def _refuse_glimpse_conflicts(args: argparse.Namespace) -> None:
    given = [flag for dest, flag in GLIMPSE_CONFLICTS if getattr(args, dest, None) is True]
    if given:
        raise StartupError(
            f"--plugin glimpse cannot run with {', '.join(given)}: pruning inside the forward "
            "needs async scheduling off (the plugin turns it off by default)"
        )


def _as_flags(message: str, method: str) -> str:
    """Name the command-line options in an error worded for knobs."""
    return rename_knobs(message, method, lambda knob: f"--{method}-{knob.replace('_', '-')}")


def _check_model_early(args: argparse.Namespace, overrides, method: str) -> None:
    """Check the model against the settings now, if its HF config can be read here.

    vLLM would report the same error later, inside a pydantic ValidationError and a traceback.
    A config that cannot be read here (unusual format, not downloaded) is left to vLLM.
    """
    model = getattr(args, "model", None)
    if not model:
        return
    try:
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(
            model, revision=getattr(args, "revision", None),
            trust_remote_code=bool(getattr(args, "trust_remote_code", False)))
    except Exception:  # noqa: BLE001 - vLLM reports unreadable models its own way
        return
    try:
        overrides(hf_config)
    except PruningSettingsError as error:
        raise StartupError(f"{model}: {_as_flags(str(error), method)}") from None
