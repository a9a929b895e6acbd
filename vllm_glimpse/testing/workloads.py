"""Deterministic prompts and synthetic images for tests, the demo and benchmarks.

Everything here is built from a small spec (image kind, size, seed, text), so two processes (the
plugin's engine and a vanilla vLLM run in a subprocess with the plugin not loaded) build exactly
the same requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

IMAGE_KINDS = ("gradient", "noise", "checker", "stripes", "solid")


def synthetic_image(kind: str, width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image with content that differs by kind and seed (never a blank frame by default)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "gradient":
        c = rng.uniform(0.2, 1.0, size=3)
        arr = np.stack([xx / max(width - 1, 1) * c[0], yy / max(height - 1, 1) * c[1],
                        (xx + yy) / max(width + height - 2, 1) * c[2]], axis=-1) * 255
    elif kind == "noise":
        arr = rng.uniform(0, 255, size=(height, width, 3))
    elif kind == "checker":
        cell = int(rng.integers(8, 48))
        mask = ((xx // cell + yy // cell) % 2).astype(np.float32)[..., None]
        a, b = rng.uniform(0, 255, size=(2, 3))
        arr = mask * a + (1 - mask) * b
    elif kind == "stripes":
        period = float(rng.uniform(6, 40))
        phase = np.sin((xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) / period * 2 * np.pi)
        arr = (phase[..., None] * 0.5 + 0.5) * rng.uniform(60, 255, size=3)
    elif kind == "solid":
        arr = np.broadcast_to(rng.uniform(0, 255, size=3), (height, width, 3))
    else:
        raise ValueError(f"unknown image kind {kind!r}; choose one of {IMAGE_KINDS}")
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")


@dataclass(frozen=True)
class ImageSpec:
    kind: str
    width: int
    height: int
    seed: int = 0

    def build(self) -> Image.Image:
        return synthetic_image(self.kind, self.width, self.height, self.seed)


@dataclass(frozen=True)
class RequestSpec:
    text: str
    images: tuple[ImageSpec, ...] = field(default_factory=tuple)


def chat_prompt(tokenizer: Any, text: str, num_images: int) -> str:
    """The model's own chat template with ``num_images`` image placeholders before the text."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": text})
    messages = [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def image_embeds_input(model_type: str, embeds: Any) -> Any:
    """The ``multi_modal_data["image"]`` entry of one image given as precomputed embeddings
    ``[n, hidden]`` (what the projector / merger would output), for vLLM's ``enable_mm_embeds``.

    Qwen2.5-VL needs a grid for M-RoPE: (t, h, w) = (1, 2, 2n) gives n tokens after the 2x2
    merge, laid out 1 x n. LLaVA-style models take ``[1, n, hidden]`` (a 2-D tensor would be read
    as n separate images)."""
    import torch

    if model_type.startswith("qwen"):
        return {"image_embeds": embeds,
                "image_grid_thw": torch.tensor([[1, 2, 2 * embeds.shape[0]]])}
    return embeds.unsqueeze(0)


def random_image_embeds(tokens: int, hidden: int, dtype: Any, seed: int) -> Any:
    """Deterministic standard-normal embeddings ``[tokens, hidden]``. Note that a model's speed
    on a CPU can depend on the values: these are not a stand-in for real projector outputs in a
    timing comparison (see benchmarks/visionzip_throughput.py)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, hidden, generator=g).to(dtype)


def build_request(tokenizer: Any, spec: RequestSpec) -> dict[str, Any]:
    """A prompt dict for ``LLM.generate``."""
    prompt: dict[str, Any] = {"prompt": chat_prompt(tokenizer, spec.text, len(spec.images))}
    if spec.images:
        images = [img.build() for img in spec.images]
        prompt["multi_modal_data"] = {"image": images[0] if len(images) == 1 else images}
    return prompt


def mixed_batch() -> list[RequestSpec]:
    """Images of several sizes and aspect ratios, a two-image prompt and text-only prompts."""
    return [
        RequestSpec("Describe the image.", (ImageSpec("gradient", 448, 448, 1),)),
        RequestSpec("What color is it?", (ImageSpec("checker", 640, 360, 2),)),
        RequestSpec("Tell me about this picture in detail.", (ImageSpec("noise", 280, 504, 3),)),
        RequestSpec("Please count the numbers.", ()),
        RequestSpec(
            "Compare the two images.",
            (ImageSpec("stripes", 336, 336, 4), ImageSpec("gradient", 224, 392, 5)),
        ),
        RequestSpec("What is in the small picture?", (ImageSpec("solid", 56, 56, 6),)),
        RequestSpec("Write one sentence about a color.", ()),
    ]
