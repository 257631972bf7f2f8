"""Preference data in the layouts people have (data.py, FORMATS): each is read from a tiny file of its schema,
trained on through PairLoader (solid-colour images: the winner is red in every pair, whichever column it is in),
with its ties and bad labels counted; two of them through train_sd15.py itself. An unknown layout is one line
that names the flags which map it."""
import json
import logging
import types

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import data
import losses
import reference
import train_sd15
from data import DataError, PairLoader, PairTransform, load_pairs
from helpers import main_or_exit, read_log, sd15_flags
from mechanics import flags, loading
from mechanics.errors import UsageError
from test_data import BLUE, GREEN, RED, encode, take, to_rgb

WHITE = (240, 240, 240)


def colours(batch):
    """(winner colours, loser colours) of a batch, each as a sorted list of RGB tuples rounded to integers."""
    n = len(batch["captions"])
    rgb = [tuple(int(round(c)) for c in to_rgb(img).tolist()) for img in batch["pixel_values"]]
    return sorted(rgb[:n]), sorted(rgb[n:])


def one_batch(pairs, size=None):
    """All pairs of a map-style dataset (or `size` of a stream) in one batch, without caption dropout."""
    (batch,) = take(PairLoader(pairs, PairTransform(8, caption_dropout=0.0), size or len(pairs)), 1)
    return batch


def data_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "data"]


def trl_parquet(path, n=6, struct=False):
    """TRL rows: prompt, chosen (red), rejected (blue), as bytes or as Image structs {bytes, path}."""
    img = (lambda c: {"bytes": encode(c), "path": None}) if struct else encode
    table = pa.table({"prompt": [f"p{i}" for i in range(n)], "chosen": [img(RED) for _ in range(n)],
                      "rejected": [img(BLUE) for _ in range(n)]})
    pq.write_table(table, path)
    return str(path)


def test_trl_bytes_and_image_structs(tmp_path, caplog):
    for struct in (False, True):
        path = trl_parquet(tmp_path / f"trl{struct}.parquet", struct=struct)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="data"):
            pairs = load_pairs(path, cache_dir=str(tmp_path / "c"))
        kind = "Image structs" if struct else "encoded bytes"
        assert any("TRL prompt/chosen/rejected pairs" in m and kind in m for m in data_lines(caplog))
        assert (len(pairs), pairs.num_ties, pairs.num_bad_labels) == (6, 0, 0)
        batch = one_batch(pairs)
        assert sorted(batch["captions"]) == [f"p{i}" for i in range(6)]
        assert colours(batch) == ([RED] * 6, [BLUE] * 6)


def test_trl_streaming_max_samples_and_resume(tmp_path):
    path = trl_parquet(tmp_path / "trl.parquet", n=10)
    stream = load_pairs(path, streaming=True, max_samples=6)
    assert isinstance(stream, data.PairStream)

    def make():
        return PairLoader(stream, PairTransform(8, random_flip=True, seed=1), 2, seed=3, shuffle_buffer=4)

    full = take(make(), 5)  # 6 rows → 3 batches per epoch, into epoch 1
    assert sorted(c for b in full[:3] for c in b["rows"].tolist()) == list(range(6))
    assert all(colours(b) == ([RED] * 2, [BLUE] * 2) for b in full)
    first = make()
    take(first, 2)
    state = first.state_dict()
    assert state == {"epoch": 0, "batch_in_epoch": 2}
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    for a, b in zip(take(resumed, 3), full[2:]):
        assert a["captions"] == b["captions"] and torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["rows"], b["rows"])


def test_open_image_preferences_layout_with_image_feature(tmp_path, caplog):
    ds = datasets.Dataset.from_dict({
        "id": [str(i) for i in range(4)], "prompt": [f"p{i}" for i in range(4)],
        "chosen": [encode(RED)] * 4, "rejected": [encode(BLUE), encode(GREEN), encode(BLUE), encode(GREEN)],
        "chosen_model": ["flux"] * 4, "rejected_model": ["sd35"] * 4, "category": ["x"] * 4})
    ds = ds.cast_column("chosen", datasets.Image()).cast_column("rejected", datasets.Image())
    path = str(tmp_path / "oip.parquet")
    ds.to_parquet(path)  # keeps the Image feature in the file, as the hub's parquet files do
    with caplog.at_level(logging.INFO, logger="data"):
        pairs = load_pairs(path, cache_dir=str(tmp_path / "c"))
    assert any("open-image-preferences pairs" in m and "Image feature" in m for m in data_lines(caplog))
    assert pairs.hf.column_names == ["caption", "jpg_0", "jpg_1"]  # models and the rest dropped
    assert colours(one_batch(pairs)) == ([RED] * 4, sorted([BLUE, GREEN, BLUE, GREEN]))
    stream = load_pairs(path, streaming=True)  # the stream decodes the same Image structs
    assert colours(one_batch(stream, 4)) == ([RED] * 4, sorted([BLUE, GREEN, BLUE, GREEN]))


def write_images(folder, names_colours):
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in names_colours.items():
        (folder / name).write_bytes(encode(colour))


def test_file_paths_resolved_against_the_files_folder(tmp_path, caplog):
    root = tmp_path / "mine"
    write_images(root / "img", {"r.png": RED, "b.png": BLUE, "g.png": GREEN})
    rows = [{"prompt": "a", "chosen": "img/r.png", "rejected": "img/b.png"},
            {"prompt": "b", "chosen": "img/r.png", "rejected": "img/g.png"},
            {"prompt": "c", "chosen": str(root / "img" / "r.png"), "rejected": "img/b.png"}]  # absolute, too
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.INFO, logger="data"):
        pairs = load_pairs(str(path), cache_dir=str(tmp_path / "c"))  # the tests run elsewhere: not the cwd
    assert any("TRL prompt/chosen/rejected pairs, images as file paths" in m for m in data_lines(caplog))
    assert colours(one_batch(pairs)) == ([RED] * 3, sorted([BLUE, GREEN, BLUE]))
    stream = load_pairs(str(path), streaming=True)
    assert colours(one_batch(stream, 3)) == ([RED] * 3, sorted([BLUE, GREEN, BLUE]))


def test_folder_layouts_and_their_captions(tmp_path, caplog):
    a = tmp_path / "a"  # chosen/ + rejected/, captions in STEM.txt
    write_images(a / "chosen", {"01.png": RED, "02.jpg": RED, "03.png": RED, "04.png": RED})
    write_images(a / "rejected", {"01.png": BLUE, "02.png": GREEN, "03.webp": BLUE})  # 04 has no partner
    for stem in ("01", "02", "03"):
        (a / "chosen" / f"{stem}.txt").write_text(f"caption {stem}\n")
    with caplog.at_level(logging.INFO, logger="data"):
        pairs = load_pairs(str(a))
    lines = data_lines(caplog)
    assert any("folder of chosen/ and rejected/ images paired by file stem" in m for m in lines)
    assert any("1 image(s) without a partner" in m for m in lines)
    assert (len(pairs), pairs.num_ties, pairs.num_bad_labels) == (3, 0, 0)
    batch = one_batch(pairs)
    assert sorted(batch["captions"]) == ["caption 01", "caption 02", "caption 03"]
    assert colours(batch) == ([RED] * 3, sorted([BLUE, GREEN, BLUE]))

    b = tmp_path / "b"  # w/ + l/, captions in metadata.jsonl (any of caption / text / prompt)
    write_images(b / "w", {"x.png": RED, "y.png": RED})
    write_images(b / "l", {"x.png": BLUE, "y.png": BLUE})
    (b / "metadata.jsonl").write_text('{"file_name": "w/x.png", "caption": "cx"}\n{"file_name": "y.png", "prompt": "cy"}\n')
    batch = one_batch(load_pairs(str(b)))
    assert sorted(batch["captions"]) == ["cx", "cy"] and colours(batch) == ([RED] * 2, [BLUE] * 2)

    c = tmp_path / "c"  # win/ + lose/, metadata.jsonl in win/, one pair uncaptioned
    write_images(c / "win", {"1.png": RED, "2.png": RED})
    write_images(c / "lose", {"1.png": GREEN, "2.png": GREEN})
    (c / "win" / "metadata.jsonl").write_text('{"file_name": "1.png", "text": "one"}\n')
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="data"):
        stream = load_pairs(str(c), streaming=True)  # the built dataset streams too
    assert any("1 of 2 pair(s) have no caption" in m for m in data_lines(caplog))
    batch = one_batch(stream, 2)
    assert sorted(batch["captions"]) == ["", "one"] and colours(batch) == ([RED] * 2, [GREEN] * 2)

    empty = tmp_path / "d"
    write_images(empty / "chosen", {"1.png": RED})
    write_images(empty / "rejected", {"1.png": BLUE})
    with pytest.raises(DataError, match="no captions: put STEM.txt") as err:
        load_pairs(str(empty))
    assert "\n" not in str(err.value)


def explicit_table(path, prefs):
    """Columns text, img_a, img_b, pref, note: the red image wins; pref is img_a's vote share."""
    a = [encode(RED if p > 0.5 else BLUE) for p in prefs]
    b = [encode(BLUE if p > 0.5 else RED) for p in prefs]
    pq.write_table(pa.table({"text": [f"t{i}" for i in range(len(prefs))], "img_a": pa.array(a, pa.binary()),
                             "img_b": pa.array(b, pa.binary()), "pref": pa.array(prefs, pa.float32()),
                             "note": ["n"] * len(prefs)}), path)
    return str(path)


def test_unknown_layout_is_one_line_with_the_flags_that_map_it(tmp_path):
    path = explicit_table(tmp_path / "x.parquet", [0.8, 0.2])
    for streaming in (False, True):
        with pytest.raises(DataError) as err:
            load_pairs(path, streaming=streaming, cache_dir=str(tmp_path / "c"))
        msg = str(err.value)
        assert "\n" not in msg and "columns found: text, img_a, img_b, pref, note" in msg
        assert "--caption_column text --chosen_column img_a --rejected_column img_b" in msg
        assert "--label_column pref" in msg and "TRL (prompt, chosen, rejected)" in msg
    with pytest.raises(DataError, match="--chosen_column img_c: no such column; columns found: text, img_a"):
        load_pairs(path, caption_column="text", chosen_column="img_c", rejected_column="img_b")
    with pytest.raises(DataError, match="must be different columns"):
        load_pairs(path, caption_column="text", chosen_column="img_a", rejected_column="img_a")
    trl = trl_parquet(tmp_path / "t.parquet")
    write_images(tmp_path / "f" / "chosen", {"1.png": RED})
    write_images(tmp_path / "f" / "rejected", {"1.png": BLUE})
    (tmp_path / "f" / "chosen" / "1.txt").write_text("x")
    with pytest.raises(DataError, match="columns are fixed") as err:  # a folder's columns are its own
        load_pairs(str(tmp_path / "f"), caption_column="text")
    assert "--caption_column text" in str(err.value)
    assert len(load_pairs(trl, caption_column="prompt", cache_dir=str(tmp_path / "c"))) == 6  # a flag on a known layout


def test_explicit_columns_with_and_without_a_label(tmp_path, caplog):
    prefs = [0.8, 0.2, 1.0, 0.0, 0.5, 0.75]
    path = explicit_table(tmp_path / "x.parquet", prefs)
    cols = dict(caption_column="text", chosen_column="img_a", rejected_column="img_b")
    with caplog.at_level(logging.INFO, logger="data"):
        pairs = load_pairs(path, label_column="pref", cache_dir=str(tmp_path / "c"), **cols)
    assert any("pref = img_a's preference" in m for m in data_lines(caplog))
    assert (len(pairs), pairs.num_ties, pairs.num_bad_labels) == (5, 1, 0)
    assert pairs.winner_is_0.tolist() == [True, False, True, False, True]  # rows 0, 1, 2, 3, 5
    batch = one_batch(pairs)
    assert sorted(batch["captions"]) == ["t0", "t1", "t2", "t3", "t5"] and colours(batch) == ([RED] * 5, [BLUE] * 5)
    no_label = load_pairs(path, cache_dir=str(tmp_path / "c"), **cols)  # img_a always wins: every row a pair
    assert (len(no_label), no_label.num_ties) == (6, 0)
    assert sorted(colours(one_batch(no_label))[0]) == sorted([RED, BLUE, RED, BLUE, BLUE, RED])


def soft_table(path):
    """Pick-a-Pic columns with vote shares (float32, as many exports store them): the red image wins."""
    shares = [0.7, 0.3, 0.55, 0.45, 0.5, 0.6, 0.9, 0.1, 1.2]  # 1.2 (label_1 = -0.2): a bad label
    rows = {"caption": [f"s{i}" for i in range(len(shares))],
            "jpg_0": [encode(RED if p > 0.5 else BLUE) for p in shares],
            "jpg_1": [encode(BLUE if p > 0.5 else RED) for p in shares],
            "label_0": pa.array(shares, pa.float32()), "label_1": pa.array([1 - p for p in shares], pa.float32())}
    pq.write_table(pa.table(rows), path)
    return str(path)


def stream_counts(stream):
    kinds = [kind for kind, _, _ in stream.iter_rows(0)]
    return kinds.count("pair"), kinds.count("tie"), kinds.count("bad")


def test_soft_labels_and_tie_margin(tmp_path):
    path = soft_table(tmp_path / "soft.parquet")
    exact = load_pairs(path, cache_dir=str(tmp_path / "c"))  # default: only p = 0.5 is a tie
    assert (len(exact), exact.num_ties, exact.num_bad_labels) == (7, 1, 1)
    assert colours(one_batch(exact)) == ([RED] * 7, [BLUE] * 7)
    margin = load_pairs(path, tie_margin=0.1, cache_dir=str(tmp_path / "c"))  # 0.55, 0.45, 0.5 and 0.6 tie
    assert (len(margin), margin.num_ties, margin.num_bad_labels) == (4, 4, 1)
    assert margin.rows.tolist() == [0, 1, 6, 7] and margin.winner_is_0.tolist() == [True, False, True, False]
    assert colours(one_batch(margin)) == ([RED] * 4, [BLUE] * 4)
    assert stream_counts(load_pairs(path, streaming=True)) == (7, 1, 1)
    assert stream_counts(load_pairs(path, streaming=True, tie_margin=0.1)) == (4, 4, 1)
    # the columns swapped by flags (image A = jpg_1, its preference label_1): the same pairs, map-style and streamed
    swapped = dict(caption_column="caption", chosen_column="jpg_1", rejected_column="jpg_0", label_column="label_1")
    flipped = load_pairs(path, tie_margin=0.1, cache_dir=str(tmp_path / "c"), **swapped)
    assert flipped.rows.tolist() == [0, 1, 6, 7] and flipped.winner_is_0.tolist() == [False, True, False, True]
    assert colours(one_batch(flipped)) == ([RED] * 4, [BLUE] * 4)
    assert colours(one_batch(load_pairs(path, streaming=True, tie_margin=0.1, **swapped), 4)) == ([RED] * 4,
                                                                                                   [BLUE] * 4)
    # through the trainers' flag and pair_loader: --tie_margin reaches data.load_pairs; 0.5 is refused
    args, _ = flags.resolve(["--dataset", path, "--tie_margin", "0.1", "--resolution", "8", "--train_batch_size",
                             "4", "--effective_batch_size", "4", "--dataloader_workers", "0", "--caption_dropout",
                             "0", "--no_flip"], "test", "sd15", train_sd15.RECIPE, {}, losses.LOSSES,
                            reference.METHODS)
    run = types.SimpleNamespace(signals=None, rank=0, world_size=1)
    (batch,) = take(loading.pair_loader(args, run), 1)
    assert sorted(batch["captions"]) == ["s0", "s1", "s6", "s7"] and colours(batch) == ([RED] * 4, [BLUE] * 4)
    with pytest.raises(UsageError, match="--tie_margin 0.5 is out of range"):
        flags.resolve(["--dataset", path, "--tie_margin", "0.5"], "test", "sd15", train_sd15.RECIPE, {},
                      losses.LOSSES, reference.METHODS)


def write_hpdv2(folder, images_in="train"):
    """HPDv2's train.json: 7 rows: 5 pairs (the red image wins each), 1 tie, 1 unreadable entry."""
    write_images(folder / images_in if images_in else folder, {"r.jpg": RED, "b.jpg": BLUE, "g.jpg": GREEN,
                                                                 "w.jpg": WHITE})
    entries = [{"prompt": "e0", "image_path": ["r.jpg", "b.jpg"], "human_preference": [1, 0]},
               {"prompt": "e1", "image_path": ["b.jpg", "r.jpg"], "human_preference": [0, 1]},
               {"prompt": "e2", "image_path": ["r.jpg", "w.jpg"], "human_preference": [1, 1]},  # a tie
               {"prompt": "e3", "image_path": ["r.jpg"], "human_preference": [1, 0]},  # unreadable: bad
               {"prompt": "e4", "image_path": ["b.jpg", "r.jpg", "g.jpg"], "human_preference": [0, 1, 0]},
               {"prompt": "e5", "file_path": ["r.jpg", "g.jpg"], "human_preference": [1, 0]}]
    (folder / "train.json").write_text(json.dumps(entries))
    return str(folder / "train.json")


def test_hpdv2_json(tmp_path, caplog):
    path = write_hpdv2(tmp_path / "HPDv2")
    with caplog.at_level(logging.INFO, logger="data"):
        pairs = load_pairs(path)
    assert any("HPDv2's json" in m for m in data_lines(caplog))
    assert (pairs.num_rows, len(pairs), pairs.num_ties, pairs.num_bad_labels) == (7, 5, 1, 1)
    batch = one_batch(pairs)
    assert sorted(batch["captions"]) == ["e0", "e1", "e4", "e4", "e5"]  # e4: red vs blue and red vs green
    assert colours(batch) == ([RED] * 5, sorted([BLUE, BLUE, BLUE, GREEN, GREEN]))
    assert pairs.winner_is_0.tolist() == [True, False, False, True, True]  # the entry's order is kept
    beside = load_pairs(write_hpdv2(tmp_path / "flat", images_in=""))  # images beside the json
    assert len(beside) == 5 and colours(one_batch(beside))[0] == [RED] * 5
    assert len(load_pairs(str(tmp_path / "HPDv2"))) == 5  # the folder that holds train.json
    assert stream_counts(load_pairs(path, streaming=True, max_samples=3)) == (2, 1, 0)
    (tmp_path / "nowhere").mkdir()
    (tmp_path / "nowhere" / "train.json").write_text(json.dumps([{"prompt": "x", "image_path": ["a.jpg", "b.jpg"],
                                                                  "human_preference": [1, 0]}]))
    with pytest.raises(DataError, match="neither in .* nor in .*train: put HPDv2's images"):
        load_pairs(str(tmp_path / "nowhere" / "train.json"))


def train(tmp_path, dataset, *extra):
    out = tmp_path / "run"
    main_or_exit(train_sd15, [*sd15_flags(), "--dataset", str(dataset), "--max_steps", "2", "--checkpoint_every",
                              "1000", "--output_dir", str(out), "--no-plot", *extra])
    return out


def test_trainer_on_a_folder_with_the_latent_cache(tmp_path, caplog):
    folder = tmp_path / "pairs"
    write_images(folder / "chosen", {f"{i}.png": RED for i in range(8)})
    write_images(folder / "rejected", {f"{i}.png": BLUE for i in range(8)})
    for i in range(8):
        (folder / "chosen" / f"{i}.txt").write_text(f"a red square {i}")
    with caplog.at_level(logging.INFO, logger="data"):
        out = train(tmp_path, folder, "--cache_latents")
    assert len(read_log(out)) == 2
    assert any("folder of chosen/ and rejected/ images" in m for m in data_lines(caplog))
    assert any((out / "cache").glob("sd15-*/meta.json"))  # trained from the cache


def test_trainer_streams_hpdv2(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="data"):
        out = train(tmp_path, write_hpdv2(tmp_path / "HPDv2"), "--streaming", "--monitor_samples", "4")
    assert len(read_log(out)) == 2
    assert any("HPDv2's json" in m for m in data_lines(caplog))


def test_trainer_maps_columns_by_flags(tmp_path, caplog):
    path = explicit_table(tmp_path / "x.parquet", [0.8, 0.2, 0.55, 0.9, 0.1, 0.3, 0.7, 0.35, 0.45, 1.0])
    with caplog.at_level(logging.INFO, logger="data"):
        out = train(tmp_path, path, "--caption_column", "text", "--chosen_column", "img_a", "--rejected_column",
                    "img_b", "--label_column", "pref", "--tie_margin", "0.1")
    assert len(read_log(out)) == 2
    assert any("10 rows -> 8 pairs (2 ties dropped" in m for m in data_lines(caplog))
