"""Questions about one cell of a mosaic of real images: the easy-vqa task made spatial.

easy-vqa (the PyPI package ``easy-vqa`` 1.0, MIT) ships 5,000 64x64 PNG images of one coloured
shape each (4,000 train, 1,000 test) with questions whose answers name the shape (circle,
rectangle, triangle), its colour (eight) or say yes / no. Here ``grid x grid`` images of one split
are tiled into a square mosaic and a question asks about one cell ("what color is the shape in
row 2, column 3?"), so the tokens an answer needs depend on the question: one cell's, a
``1 / grid**2`` share of the image. Each sample carries that cell's pixel box, the grounding a
VIP is trained against (the GlimpsePrune authors' first stage supervises the predicted mask with
boxes).

Samples are a pure function of (split, index, seed): the same on every machine, nothing downloads.
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
ANSWERS = SHAPES + COLORS + ("yes", "no")
#: question kinds, drawn with equal odds
KINDS = ("color", "shape", "is_color", "is_shape")


@dataclass(frozen=True)
class Cell:
    image_id: int
    shape: str
    color: str


@dataclass(frozen=True)
class MosaicSample:
    """One question about one cell. ``box`` is the cell's (x0, y0, x1, y1) in mosaic pixels."""

    split: str
    index: int
    cells: tuple[Cell, ...]  # row-major
    cell: int
    kind: str
    question: str
    answer: str
    grid: int
    side: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        size = self.side // self.grid
        row, col = divmod(self.cell, self.grid)
        return col * size, row * size, (col + 1) * size, (row + 1) * size

    def image(self):
        """The mosaic as an RGB ``PIL.Image`` of ``side x side`` pixels."""
        from PIL import Image

        size = self.side // self.grid
        mosaic = Image.new("RGB", (self.side, self.side), (255, 255, 255))
        paths = _image_paths(self.split)
        for i, cell in enumerate(self.cells):
            row, col = divmod(i, self.grid)
            with Image.open(paths[cell.image_id]) as im:
                tile = im.convert("RGB").resize((size, size), Image.Resampling.NEAREST)
            mosaic.paste(tile, (col * size, row * size))
        return mosaic


def _data_dir() -> Path:
    try:
        import easy_vqa
    except ImportError as e:  # pragma: no cover - the train / test extras install it
        raise ImportError("the easy-vqa mosaics need the PyPI package easy-vqa==1.0 "
                          "(pip install 'vllm-glimpse[train]')") from e
    return Path(easy_vqa.__file__).parent / "data"


@functools.cache
def _image_paths(split: str) -> dict[int, Path]:
    folder = _data_dir() / split / "images"
    return {int(p.stem): p for p in folder.glob("*.png")}


_NEG = re.compile(r"\b(?:not|no)\b")


@functools.cache
def cells_of(split: str) -> tuple[Cell, ...]:
    """Every image of the split whose shape and colour its questions determine, by id.

    easy-vqa stores questions, not labels; each question names a shape or a colour (or answers
    with one), and yes / no answers (negated by "not" or "no") say whether it holds. A shape that is
    never named comes from the two that are ruled out."""
    with open(_data_dir() / split / "questions.json") as f:
        questions = json.load(f)
    found: dict[int, dict[str, set[str]]] = {}
    for text, answer, image_id in questions:
        facts = found.setdefault(image_id, {"shape": set(), "color": set(), "not_shape": set()})
        words = re.findall(r"[a-z]+", text)
        shape = next((w for w in words if w in SHAPES), None)
        color = next((w for w in words if w in COLORS), None)
        if answer in SHAPES:
            facts["shape"].add(answer)
            if color:
                facts["color"].add(color)
        elif answer in COLORS:
            facts["color"].add(answer)
            if shape:
                facts["shape"].add(shape)
        else:
            holds = (answer == "yes") != bool(_NEG.search(text))
            if holds:
                facts["shape" if shape else "color"].add(shape or color)
            elif shape:
                facts["not_shape"].add(shape)
    cells = []
    for image_id in sorted(found):
        facts = found[image_id]
        shapes = facts["shape"] or (set(SHAPES) - facts["not_shape"])
        if len(shapes) == 1 and len(facts["color"]) == 1:
            cells.append(Cell(image_id, next(iter(shapes)), next(iter(facts["color"]))))
    return tuple(cells)


def _where(cell: int, grid: int) -> str:
    row, col = divmod(cell, grid)
    return f"row {row + 1}, column {col + 1}"


def mosaic_sample(split: str, index: int, *, grid: int = 4, side: int = 448,
                  seed: int = 0) -> MosaicSample:
    """Sample ``index`` of ``split`` ("train" or "test"): ``grid**2`` distinct images of the split
    and a question about one cell; yes / no questions are true half of the time."""
    if split not in ("train", "test"):
        raise ValueError(f"easy-vqa split must be 'train' or 'test', not {split!r}")
    if grid < 1 or side % grid:
        raise ValueError(f"a {grid}x{grid} mosaic needs a side divisible by {grid}; got {side}")
    pool = cells_of(split)
    rng = random.Random(f"{seed}:{split}:{index}")
    cells = tuple(rng.sample(pool, grid * grid))
    cell = rng.randrange(grid * grid)
    kind = rng.choice(KINDS)
    target, where = cells[cell], _where(cell, grid)
    if kind == "color":
        question, answer = f"what color is the shape in {where}?", target.color
    elif kind == "shape":
        question, answer = f"what shape is in {where}?", target.shape
    elif kind == "is_color":
        truth = rng.random() < 0.5
        color = target.color if truth else rng.choice([c for c in COLORS if c != target.color])
        question, answer = f"is the shape in {where} {color}?", "yes" if truth else "no"
    else:
        truth = rng.random() < 0.5
        shape = target.shape if truth else rng.choice([s for s in SHAPES if s != target.shape])
        question, answer = f"is there a {shape} in {where}?", "yes" if truth else "no"
    return MosaicSample(split, index, cells, cell, kind, question, answer, grid, side)


def majority_rate(samples) -> tuple[str, float]:
    """The most frequent answer among ``samples`` and its share: what always guessing it scores."""
    counts: dict[str, int] = {}
    for s in samples:
        counts[s.answer] = counts.get(s.answer, 0) + 1
    answer = max(counts, key=counts.get)
    return answer, counts[answer] / max(1, sum(counts.values()))


def answer_of(text: str) -> str:
    """The answer a generation gives: its first word, lower-cased (or '' when it has none)."""
    words = re.findall(r"[a-z]+", text.lower())
    return words[0] if words else ""
