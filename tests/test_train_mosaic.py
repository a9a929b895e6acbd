"""The easy-vqa mosaic task: labels recovered from easy-vqa's questions, deterministic samples, the
asked cell's box, and the answer parser. No engine starts."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

pytest.importorskip("easy_vqa")

from vllm_glimpse.train import mosaic  # noqa: E402


@pytest.mark.parametrize("split", ["train", "test"])
def test_labels_answer_every_question_of_easy_vqa(split):
    """Each labelled image's shape and colour answer every one of its easy-vqa questions as the
    dataset does (asked here by a rule written independently of the parser), and most images
    are labelled."""
    cells = {c.image_id: c for c in mosaic.cells_of(split)}
    with open(mosaic._data_dir() / split / "questions.json") as f:
        questions = json.load(f)
    assert len(cells) > 0.85 * len({q[2] for q in questions})
    checked = 0
    for text, answer, image_id in questions:
        cell = cells.get(image_id)
        if cell is None:
            continue
        if answer in mosaic.SHAPES:
            assert cell.shape == answer, (text, cell)
        elif answer in mosaic.COLORS:
            assert cell.color == answer, (text, cell)
        else:
            named = [w for w in re.findall(r"[a-z]+", text)
                     if w in mosaic.SHAPES or w in mosaic.COLORS]
            assert len(named) == 1, text
            present = named[0] in (cell.shape, cell.color)
            negated = " not " in f" {text} " or " no " in f" {text} "
            assert (answer == "yes") == (present != negated), (text, answer, cell)
        checked += 1
    assert checked > 0.8 * len(questions)


def test_samples_are_deterministic_and_ask_about_their_cell():
    a = mosaic.mosaic_sample("test", 7, seed=3)
    b = mosaic.mosaic_sample("test", 7, seed=3)
    assert a == b and a != mosaic.mosaic_sample("test", 8, seed=3)
    assert len(set(a.cells)) == 16  # distinct images
    target = a.cells[a.cell]
    row, col = divmod(a.cell, 4)
    assert f"row {row + 1}, column {col + 1}" in a.question
    if a.kind == "color":
        assert a.answer == target.color
    elif a.kind == "shape":
        assert a.answer == target.shape
    assert a.answer in mosaic.ANSWERS


def test_the_box_holds_the_asked_cells_image():
    """The mosaic's pixels inside the sample's box are its cell's easy-vqa image (scaled)."""
    from PIL import Image

    s = mosaic.mosaic_sample("train", 11, grid=4, side=448)
    image = np.asarray(s.image())
    assert image.shape == (448, 448, 3)
    x0, y0, x1, y1 = s.box
    assert (x1 - x0, y1 - y0) == (112, 112)
    with Image.open(mosaic._image_paths("train")[s.cells[s.cell].image_id]) as im:
        want = np.asarray(im.convert("RGB").resize((112, 112), Image.Resampling.NEAREST))
    assert np.array_equal(image[y0:y1, x0:x1], want)


def test_question_kinds_are_balanced_and_majority_is_low():
    samples = [mosaic.mosaic_sample("test", i) for i in range(2000)]
    kinds = {k: sum(s.kind == k for s in samples) for k in mosaic.KINDS}
    assert all(400 < n < 600 for n in kinds.values()), kinds
    answer, rate = mosaic.majority_rate(samples)
    assert answer in ("yes", "no") and 0.2 < rate < 0.3


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        mosaic.mosaic_sample("val", 0)
    with pytest.raises(ValueError, match="needs a side divisible by 3"):
        mosaic.mosaic_sample("test", 0, grid=3, side=448)


@pytest.mark.parametrize("text, want", [(" circle", "circle"), ("Yes.", "yes"),
                                        ("teal shape", "teal"), ("", ""), ("42", "")])
def test_answer_of(text, want):
    assert mosaic.answer_of(text) == want
