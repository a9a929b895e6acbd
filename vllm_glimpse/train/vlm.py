"""Train a small vision-language model on easy-vqa mosaics, from a fixed seed, on the CPU.

The model has the layout of a real checkpoint (Qwen2.5-VL: ViT with window and full attention,
2x2 merger, M-RoPE Qwen2 LLM; LLaVA-1.5: CLIP ViT, two-layer projector, Llama) at small widths:
the geometry, tokenizer, chat template and processor of the project's tiny test models
(``vllm_glimpse.testing.tiny_models``), every weight trained here with Hugging Face
transformers, then written in the official hub naming that vLLM's default loader reads.

The task (:mod:`.mosaic`): a 4x4 mosaic of easy-vqa images and a question about one cell, so the
model must find the right cell's tokens. The loss is the cross-entropy of the answer and the
chat's end-of-turn token (the prompt is not a target), AdamW with linear warm-up and cosine decay.

    python -m vllm_glimpse.train vlm --family qwen2_5_vl --out DIR [--steps N] [--batch-size B]
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_glimpse.train.mosaic import MosaicSample, mosaic_sample

logger = logging.getLogger("vllm_glimpse.train")

#: the mosaic's side in pixels per family: 4x4 cells of 28 px-token multiples for Qwen2.5-VL
#: (16 x 16 = 256 image tokens, 16 per cell), CLIP's fixed 336 px for LLaVA-1.5 (576 tokens,
#: 36 per cell)
SIDES = {"qwen2_5_vl": 448, "llava": 336}
#: the end-of-turn text each chat template closes an assistant message with (Qwen2.5-VL's
#: ``<|im_end|>``, LLaVA-1.5's end-of-sequence token)
END_OF_TURN = {"qwen2_5_vl": "<|im_end|>", "llava": "</s>"}


@dataclass
class TrainConfig:
    family: str = "qwen2_5_vl"
    steps: int = 1500
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    grid: int = 4
    threads: int | None = None  # torch threads (default: every CPU)

    def __post_init__(self) -> None:
        if self.family not in SIDES:
            raise ValueError(f"family must be one of {', '.join(SIDES)}; got {self.family!r}")
        for name in ("steps", "batch_size", "grid"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")

    @property
    def side(self) -> int:
        return SIDES[self.family]


def chat_prompt(processor, question: str) -> str:
    """The generation prompt for one image and a question, from the model's chat template."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _batch(processor, family: str, samples: list[MosaicSample]):
    """Processor inputs for prompt + answer + end of turn, with labels on the answer's tokens."""
    import torch

    tok = processor.tokenizer
    prompts = [chat_prompt(processor, s.question) for s in samples]
    answer_text = [(" " if family == "llava" else "") + s.answer + END_OF_TURN[family]
                   for s in samples]
    texts = [p + a for p, a in zip(prompts, answer_text)]
    # The answer's token count: the full text's minus the prompt's, before the processor expands
    # the one image placeholder (both tokenize identically up to the prompt's end).
    n_answer = [len(tok(t, add_special_tokens=False).input_ids)
                - len(tok(p, add_special_tokens=False).input_ids) for t, p in zip(texts, prompts)]
    tok.padding_side = "right"
    inputs = processor(text=texts, images=[s.image() for s in samples], return_tensors="pt",
                       padding=True)
    labels = torch.full_like(inputs["input_ids"], -100)
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    for i, (length, n) in enumerate(zip(lengths, n_answer)):
        labels[i, length - n:length] = inputs["input_ids"][i, length - n:length]
    inputs["labels"] = labels
    return inputs


def _hub_name(family: str, name: str) -> str:
    """transformers 5's parameter name -> the official checkpoint's (what vLLM's loader maps)."""
    if family == "qwen2_5_vl":
        name = re.sub(r"^model\.visual\.", "visual.", name)
        return re.sub(r"^model\.language_model\.", "model.", name)
    name = re.sub(r"^model\.vision_tower\.", "vision_tower.", name)
    name = re.sub(r"^model\.multi_modal_projector\.", "multi_modal_projector.", name)
    name = re.sub(r"^model\.language_model\.", "language_model.model.", name)
    return re.sub(r"^lm_head\.", "language_model.lm_head.", name)


def train_vlm(cfg: TrainConfig, out_dir: str | os.PathLike, *, log_every: int = 50) -> dict:
    """Train ``cfg.family`` and write the checkpoint to ``out_dir`` (replaced); returns the
    training report (also written to ``out_dir/train_report.json``)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from vllm_glimpse.testing.tiny_models import generate

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    generate(cfg.family, out)  # geometry, tokenizer, chat template, processor configs
    reference_names = set(load_file(out / "model.safetensors"))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    config = AutoConfig.from_pretrained(out)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(out)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start, losses, history = time.monotonic(), [], []
    for step in range(cfg.steps):
        samples = [mosaic_sample("train", step * cfg.batch_size + i, grid=cfg.grid,
                                 side=cfg.side, seed=cfg.seed) for i in range(cfg.batch_size)]
        loss = model(**_batch(processor, cfg.family, samples)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            mean = sum(losses[-log_every:]) / len(losses[-log_every:])
            history.append({"step": step + 1, "loss": mean,
                            "seconds": time.monotonic() - start})
            logger.info("step %d/%d loss %.4f (%.0f s)", step + 1, cfg.steps, mean,
                        time.monotonic() - start)
    seconds = time.monotonic() - start

    tensors = {_hub_name(cfg.family, n): p.detach().contiguous()
               for n, p in model.state_dict().items()}
    if set(tensors) != reference_names:
        raise RuntimeError("trained weights do not match the checkpoint layout: "
                           f"missing {sorted(reference_names - set(tensors))[:5]}, "
                           f"extra {sorted(set(tensors) - reference_names)[:5]}")
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    report = {"config": asdict(cfg), "side": cfg.side, "train_seconds": seconds,
              "threads": torch.get_num_threads(), "samples_seen": cfg.steps * cfg.batch_size,
              "final_loss": history[-1]["loss"], "history": history}
    (out / "train_report.json").write_text(json.dumps(report, indent=1))
    return report
