"""eval.side_by_side, the picture train_sd15.py --tiny's report ends with: same-seed pairs under a header that
names the baseline (left) and the model (right), each pair over its prompt."""
from types import SimpleNamespace

import numpy as np
from PIL import Image, PngImagePlugin

import eval as ev

SIZE, SCALE = 16, 3
PROMPTS = {0: "a red cube", 1: "a photograph of a very small blue sphere resting on a long wooden table in the "
                               "late afternoon sun, with many more words than two lines can hold", 2: "x"}


def write_store(folder, colour, prompts):
    """A model's image store as eval.py writes it: one PNG per (prompt, seed), the prompt inside it."""
    folder.mkdir(parents=True)
    for idx, prompt in prompts.items():
        info = PngImagePlugin.PngInfo()
        info.add_itxt("prompt", prompt)
        Image.new("RGB", (SIZE, SIZE), colour).save(ev.image_path(folder, idx, 0), pnginfo=info)
    return folder


def result(tmp_path, prompts=PROMPTS):
    stores = {"base": write_store(tmp_path / "base", (200, 0, 0), prompts),
              "tuned": write_store(tmp_path / "tuned", (0, 0, 200), prompts)}
    scores = {"toy_label": {label: {(idx, 0): 0.5 for idx in prompts} for label in stores}}
    return SimpleNamespace(summary={"model": "tuned", "models": {k: {"images": str(v)} for k, v in stores.items()}},
                           scores=scores)


def test_the_pairs_sit_under_a_header_and_over_their_prompts(tmp_path):
    out = ev.side_by_side(result(tmp_path), tmp_path / "sbs.png", "base", count=3, columns=3, scale=SCALE)
    grid = np.asarray(Image.open(out).convert("RGB")).astype(int)
    w = h = SIZE * SCALE
    gap = max(2, SIZE // 8) * SCALE
    assert grid.shape[1] == 3 * 2 * w + 2 * gap  # as wide as the pairs: the text fits inside them
    assert grid.shape[0] > h + 2 * 10  # taller than one row of pairs: a header row and captions
    red = np.all(grid == (200, 0, 0), axis=2)
    blue = np.all(grid == (0, 0, 200), axis=2)
    top = np.argmax(red.any(axis=1))  # the first row of image pixels
    bottom = grid.shape[0] - np.argmax(red[::-1].any(axis=1))
    assert bottom - top == h and blue[top:bottom].any()
    assert red[top:bottom, :w].all() and blue[top:bottom, w:2 * w].all()  # the baseline left, the model right
    inked = lambda rows, x0, x1: (grid[rows, x0:x1] < 200).any()  # dark pixels: text on the white
    header = slice(0, top)
    assert top >= 10 and inked(header, 0, w) and inked(header, w, 2 * w)  # "base" over the left, "tuned" over the right
    assert not inked(header, 2 * w, 2 * w + gap)  # nothing written over the gap between pairs
    captions = slice(bottom, grid.shape[0])
    assert bottom <= grid.shape[0] - 10
    assert all(inked(captions, i * (2 * w + gap), i * (2 * w + gap) + 2 * w) for i in range(3))


def test_a_long_prompt_wraps_to_a_second_line_and_is_cut_there(tmp_path):
    res = result(tmp_path)
    two = np.asarray(Image.open(ev.side_by_side(res, tmp_path / "2.png", "base", count=3, columns=3)).convert("L"))
    three = np.asarray(Image.open(ev.side_by_side(res, tmp_path / "3.png", "base", count=3, columns=3,
                                                   caption_lines=3)).convert("L"))
    assert two.shape[1] == three.shape[1] and three.shape[0] - two.shape[0] >= 8  # room for one more text line
    pair, gap = 2 * SIZE * SCALE, max(2, SIZE // 8) * SCALE
    under = two[-(two.shape[0] - np.nonzero((two < 60).any(axis=1))[0].max() - 1):]  # below the images (dark)
    ink = lambda i: np.nonzero((under[:, i * (pair + gap): i * (pair + gap) + pair] < 200).any(axis=1))[0]
    first_line_end = ink(2).max()  # the third prompt, "x": one line
    assert ink(1).max() > first_line_end + 4  # the long prompt goes on below it: a second line
    # ... and stops there: with room for three lines, the third picture's long caption reaches further down.
    under3 = three[-(three.shape[0] - np.nonzero((three < 60).any(axis=1))[0].max() - 1):]
    ink3 = np.nonzero((under3[:, pair + gap: 2 * pair + gap] < 200).any(axis=1))[0]
    assert ink3.max() > ink(1).max() + 4
