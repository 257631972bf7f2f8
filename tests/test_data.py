"""Tests for data.py: Pick-a-Pic rows written as real parquet files, read back through load_pairs/PairLoader."""
import io
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import data
from data import DataError, PairLoader, PairTransform, collate_pairs, load_pairs
from offline.tiny import TINY_COLOURS, write_tiny_pickapic

RED, BLUE, GREEN = (220, 20, 20), (20, 20, 220), (20, 200, 20)


def encode(array_or_colour, size=(16, 16), fmt="PNG") -> bytes:
    """PNG (or JPEG) bytes of an HxWx3 array, or of a solid colour of `size` (h, w)."""
    if isinstance(array_or_colour, tuple):
        array_or_colour = np.broadcast_to(np.array(array_or_colour, np.uint8), (*size, 3)).copy()
    buf = io.BytesIO()
    Image.fromarray(array_or_colour).save(buf, format=fmt)
    return buf.getvalue()


def write_rows(path, rows) -> str:
    """Write dict rows (jpg_* as bytes) to a parquet file with Pick-a-Pic column types."""
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    table = pa.table({k: pa.array(v, type=pa.binary() if k.startswith("jpg_") else None) for k, v in cols.items()})
    pq.write_table(table, path)
    return str(path)


def row(caption, img0, img1, label_0, label_1=None):
    return {"caption": caption, "jpg_0": img0, "jpg_1": img1, "label_0": label_0,
            "label_1": (1.0 - label_0) if label_1 is None else label_1}


def take(loader, n):
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    it.close()  # shut the DataLoader (and its workers) down now
    return out


def to_rgb(pixels):
    """[-1, 1] CHW → mean RGB in 0..255."""
    return ((pixels + 1) * 127.5).mean(dim=(1, 2))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_pickapic(tmp_path_factory.mktemp("tiny"), num_pairs=64, resolution=32, seed=0)


@pytest.fixture(scope="module")
def tiny_pairs(tiny, tmp_path_factory):
    return load_pairs(tiny, cache_dir=str(tmp_path_factory.mktemp("cache")))


def test_ties_dropped_and_winner_first(tmp_path):
    red, blue, green = encode(RED), encode(BLUE), encode(GREEN)
    rows = [row("w0", red, blue, 1.0), row("tie", green, green, 0.5), row("w1", blue, red, 0.0),
            row("w0b", red, blue, 1.0), row("tie2", green, blue, 0.5), row("w1b", blue, red, 0.0)]
    pairs = load_pairs(write_rows(tmp_path / "p.parquet", rows), cache_dir=str(tmp_path / "c"))
    assert (len(pairs), pairs.num_ties, pairs.num_bad_labels) == (4, 2, 0)
    assert sorted(pairs.rows.tolist()) == [0, 2, 3, 5]
    (batch,) = take(PairLoader(pairs, PairTransform(8, caption_dropout=0.0), batch_size=4), 1)
    assert batch["pixel_values"].shape == (8, 3, 8, 8) and batch["num_skipped"] == 0
    assert sorted(batch["captions"]) == ["w0", "w0b", "w1", "w1b"]
    for colour, half in ((RED, batch["pixel_values"][:4]), (BLUE, batch["pixel_values"][4:])):
        for img in half:  # winners all red, losers all blue, whatever the column the winner was in
            assert torch.allclose(to_rgb(img), torch.tensor(colour, dtype=torch.float32), atol=1.0)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1


def test_bad_image_skipped_counted_and_logged(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(data, "_warned", {})  # earlier tests in this process may have used up the first warnings
    red, blue = encode(RED), encode(BLUE)
    rows = [row(f"c{i}", red, blue, 1.0) for i in range(4)]
    rows[2]["jpg_1"] = b"\x89PNG\r\n\x1a\n this is not an image"
    pairs = load_pairs(write_rows(tmp_path / "p.parquet", rows), cache_dir=str(tmp_path / "c"))
    with caplog.at_level(logging.WARNING, logger="data"):
        (batch,) = take(PairLoader(pairs, PairTransform(8, caption_dropout=0.0), batch_size=4), 1)
    assert batch["num_skipped"] == 1 and sorted(batch["captions"]) == ["c0", "c1", "c3"]
    assert batch["pixel_values"].shape[0] == 6 and batch["original_sizes"].shape == (6, 2)
    assert any("row 2" in r.getMessage() and "jpg_1" in r.getMessage() for r in caplog.records)


def test_all_pairs_of_a_batch_skipped_carries_the_count(tmp_path):
    red, blue = encode(RED), encode(BLUE)
    rows = [row(f"c{i}", b"junk", blue, 1.0) for i in range(2)] + [row(f"d{i}", red, blue, 1.0) for i in range(2)]
    pairs = load_pairs(write_rows(tmp_path / "p.parquet", rows), cache_dir=str(tmp_path / "c"))
    loader = PairLoader(pairs, PairTransform(8), batch_size=2, seed=3)
    batches = take(loader, 3)  # 2 batches per epoch; a batch of two bad rows is never yielded
    assert all(len(b["captions"]) > 0 for b in batches)
    assert sum(b["num_skipped"] for b in batches) + sum(len(b["captions"]) for b in batches) >= 6


def test_missing_column_is_a_one_line_error(tmp_path):
    rows = [{"caption": "a", "jpg_0": encode(RED), "jpg_1": encode(BLUE), "label_0": 1.0}]
    with pytest.raises(DataError) as err:
        load_pairs(write_rows(tmp_path / "p.parquet", rows), cache_dir=str(tmp_path / "c"))
    msg = str(err.value)
    assert "label_1" in msg and "columns found" in msg and "label_0" in msg and "\n" not in msg
    with pytest.raises(DataError, match="label_1"):
        load_pairs(str(tmp_path / "p.parquet"), streaming=True)


def test_bad_labels_skipped_and_counted_without_decoding(tmp_path, caplog, monkeypatch):
    red, blue = encode(RED), encode(BLUE)
    rows = [row("ok0", red, blue, 1.0), row("bad_value", b"junk", b"junk", 1.3, -0.3),
            row("bad_sum", b"junk", b"junk", 1.0, 1.0), row("ok1", blue, red, 0.0),
            row("bad_null", b"junk", b"junk", None, 1.0), row("tie", red, red, 0.5)]
    decoded = []
    monkeypatch.setattr(data, "decode_image", lambda v: decoded.append(v))
    with caplog.at_level(logging.WARNING, logger="data"):
        pairs = load_pairs(write_rows(tmp_path / "p.parquet", rows), cache_dir=str(tmp_path / "c"))
    assert not decoded  # the label check reads the label columns only
    assert (len(pairs), pairs.num_bad_labels, pairs.num_ties) == (2, 3, 1)
    assert sorted(pairs.rows.tolist()) == [0, 3]
    assert any("3 row(s)" in r.getMessage() for r in caplog.records)


def test_all_ties_is_an_error(tmp_path):
    rows = [row(f"t{i}", encode(RED), encode(BLUE), 0.5) for i in range(3)]
    with pytest.raises(DataError, match="no preference pairs"):
        load_pairs(write_rows(tmp_path / "p.parquet", rows), cache_dir=str(tmp_path / "c"))


def test_unreachable_hub_is_a_one_line_error():
    with pytest.raises(DataError, match="local folder") as err:  # conftest sets HF_HUB_OFFLINE=1
        load_pairs("no-such-owner/no-such-dataset")
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="no such file or folder"):
        load_pairs("./no/such/folder")


def coordinate_image(h, w):
    """R encodes x, G encodes y: where a crop came from is visible in its pixels."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.full_like(x, 128)], -1).astype(np.uint8)


def test_same_crop_and_flip_for_both_images_and_sizes_reported(tmp_path):
    res = 20
    img_w, img_l = coordinate_image(40, 60), coordinate_image(50, 100)  # non-square, different sizes
    rows = [row(f"c{i}", encode(img_w), encode(img_l), 1.0) for i in range(8)]
    pairs = load_pairs(write_rows(tmp_path / "p.parquet", rows), cache_dir=str(tmp_path / "c"))
    transform = PairTransform(res, random_crop=True, random_flip=True, caption_dropout=0.0, seed=5)
    batches = take(PairLoader(pairs, transform, batch_size=4), 6)  # 3 epochs of 2 batches
    flips, lefts = [], []
    for b in batches:
        n = len(b["captions"])
        assert b["original_sizes"].tolist() == [[40, 60]] * n + [[50, 100]] * n
        for i in range(n):
            pw, pl = b["pixel_values"][i], b["pixel_values"][n + i]
            (tw, lw), (tl, ll) = b["crop_top_lefts"][i].tolist(), b["crop_top_lefts"][n + i].tolist()
            # resized sizes: 40x60 → 20x30, 50x100 → 20x40; crops in range and at the same relative place
            assert (tw, tl) == (0, 0) and 0 <= lw <= 10 and 0 <= ll <= 20
            assert abs(lw / 10 - ll / 20) <= 0.1
            # the reported offsets are the real ones: redo resize → (flip) → crop with PIL and compare
            flip_w = pw[0, 0, 0] > pw[0, 0, -1]  # R decreases left to right iff flipped
            flip_l = pl[0, 0, 0] > pl[0, 0, -1]
            assert flip_w == flip_l
            for pix, src, (nh, nw), left in ((pw, img_w, (20, 30), lw), (pl, img_l, (20, 40), ll)):
                ref = Image.fromarray(src).resize((nw, nh), Image.BILINEAR)
                if flip_w:
                    ref = ref.transpose(Image.FLIP_LEFT_RIGHT)
                ref = np.asarray(ref.crop((left, 0, left + res, res)), np.float32)
                assert np.abs(((pix.permute(1, 2, 0).numpy() + 1) * 127.5) - ref).max() < 0.51
            flips.append(bool(flip_w))
            lefts.append(lw)
    assert 0 < sum(flips) < len(flips) and len(set(lefts)) > 3  # flips and crops do vary


def test_center_crop_offsets():
    img = coordinate_image(30, 50)
    pair = {"caption": "x", "jpg_w": encode(img), "jpg_l": encode(coordinate_image(50, 30)), "row": 0}
    item = PairTransform(10, caption_dropout=0.0)(pair, epoch=0, key=0)
    # 30x50 → 10x17: left = round(7 / 2) = 4 (banker's rounding as torchvision); 50x30 → 17x10: top = 4
    assert item["original_sizes"] == ((30, 50), (50, 30))
    assert item["crop_top_lefts"] == ((0, 4), (4, 0))
    batch = collate_pairs([item, None])
    assert batch["num_skipped"] == 1 and batch["crop_top_lefts"].tolist() == [[0, 4], [4, 0]]


def test_caption_dropout_rate():
    t = PairTransform(8, caption_dropout=0.2, seed=11)
    drops = [t.draws(epoch, key)["drop_caption"] for epoch in range(2) for key in range(3000)]
    assert abs(np.mean(drops) - 0.2) < 0.025  # 6000 draws: σ ≈ 0.005
    assert not any(PairTransform(8, caption_dropout=0.0).draws(0, k)["drop_caption"] for k in range(500))


def test_caption_dropout_applied_by_the_loader(tiny_pairs):
    transform = PairTransform(8, caption_dropout=0.2, seed=1)
    loader = PairLoader(tiny_pairs, transform, batch_size=7, seed=2)
    dropped, total = 0, 0
    it = iter(loader)
    for _ in range(16):  # 2 epochs of 8 batches
        epoch = loader.state_dict()["epoch"]
        b = next(it)
        for cap, r in zip(b["captions"], b["rows"].tolist()):
            assert (cap == "") == transform.draws(epoch, r)["drop_caption"]
            dropped, total = dropped + (cap == ""), total + 1
    it.close()
    assert total == 112 and 0.08 < dropped / total < 0.35


def test_ranks_get_disjoint_equal_shards(tiny_pairs):
    n, world = len(tiny_pairs), 3  # 56 pairs: 18 per rank, 2 left out each epoch
    per_epoch = {}
    for epoch in range(2):
        shards = [PairLoader(tiny_pairs, PairTransform(8), 3, rank=r, world_size=world).epoch_indices(epoch)
                  for r in range(world)]
        assert [len(s) for s in shards] == [n // world] * world
        flat = [i for s in shards for i in s]
        assert len(set(flat)) == len(flat) == n // world * world and set(flat) <= set(range(n))
        per_epoch[epoch] = shards
    assert per_epoch[0] != per_epoch[1]
    # and the batches a rank trains on are its shard, in order (6 batches of 3 = one epoch)
    rows = []
    for r in range(world):
        got = [x for b in take(PairLoader(tiny_pairs, PairTransform(8), 3, rank=r, world_size=world), 6)
               for x in b["rows"].tolist()]
        assert got == tiny_pairs.rows[per_epoch[0][r]].tolist()
        rows += got
    assert len(set(rows)) == len(rows) == 54


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["captions"] == y["captions"] and x["num_skipped"] == y["num_skipped"]
        for k in ("pixel_values", "original_sizes", "crop_top_lefts", "rows"):
            assert torch.equal(x[k], y[k]), k


def test_resume_gives_the_same_next_batches(tiny_pairs):
    def make():
        return PairLoader(tiny_pairs, PairTransform(24, random_crop=True, random_flip=True, seed=3), 8, seed=7)

    full = take(make(), 10)  # 7 batches per epoch: crosses into epoch 1
    first = make()
    take(first, 4)
    state = first.state_dict()
    assert state == {"epoch": 0, "batch_in_epoch": 4}
    calls = []
    resumed = make()
    resumed.load_state_dict(state)
    inner = resumed.transform
    resumed.transform = lambda pair, epoch, key: calls.append(key) or inner(pair, epoch, key)
    same_batches(take(resumed, 6), full[4:])
    assert len(calls) == 6 * 8  # the 4 consumed batches were not decoded again
    assert resumed.state_dict() == {"epoch": 1, "batch_in_epoch": 3}
    at_epoch_end = make()
    at_epoch_end.load_state_dict({"epoch": 0, "batch_in_epoch": 7})
    assert at_epoch_end.state_dict() == {"epoch": 1, "batch_in_epoch": 0}
    same_batches(take(at_epoch_end, 1), full[7:8])


def test_num_workers_do_not_change_batches(tiny_pairs):
    def batches(workers):
        t = PairTransform(24, random_crop=True, random_flip=True, caption_dropout=0.2, seed=1)
        return take(PairLoader(tiny_pairs, t, 6, num_workers=workers, seed=4), 11)  # 9 per epoch

    same_batches(batches(0), batches(2))


def test_streaming_local_parquet(tiny, tmp_path):
    stream = load_pairs(tiny, streaming=True)
    assert isinstance(stream, data.PairStream)

    def make(workers=0):
        return PairLoader(stream, PairTransform(16, random_crop=True, random_flip=True, seed=2), 8,
                          num_workers=workers, seed=1, shuffle_buffer=16)

    full = take(make(), 9)  # 56 pairs → 7 batches per epoch
    assert all(b["pixel_values"].shape == (16, 3, 16, 16) and b["num_skipped"] == 0 for b in full)
    # shuffled (not file order) and different in the next epoch
    caps = [c for b in full[:7] for c in b["captions"]]
    assert len(caps) == 56
    assert [c for b in full[7:9] for c in b["captions"]] != caps[:16]
    # winners (smooth) vs losers (noise): neighbouring-pixel differences tell them apart
    px = torch.cat([b["pixel_values"] for b in full[:7]]).view(7, 2, 8, 3, 16, 16)
    rough = (px[..., 1:] - px[..., :-1]).abs().mean(dim=(-1, -2, -3))  # [batch, half, pair]
    assert (rough[:, 0] < rough[:, 1]).all()
    # resume by re-reading, and workers only decode: same batches
    part = make()
    take(part, 3)
    resumed = make(workers=2)
    resumed.load_state_dict(part.state_dict())
    same_batches(take(resumed, 6), full[3:])


def test_streaming_counts_bad_labels_and_two_ranks(tmp_path):
    red, blue = encode(RED), encode(BLUE)
    rows = [row(f"c{i}", red, blue, 1.0) for i in range(10)] + [row("bad", red, blue, 0.3, 0.6),
                                                                   row("tie", red, red, 0.5)]
    path = write_rows(tmp_path / "p.parquet", rows)
    (batch,) = take(PairLoader(load_pairs(path, streaming=True), PairTransform(8, caption_dropout=0.0), 10), 1)
    assert sorted(batch["captions"]) == sorted(f"c{i}" for i in range(10))
    assert batch["num_skipped"] == 1
    stream, caps = load_pairs(path, streaming=True), []
    for r in range(2):  # split_dataset_by_node: disjoint parts (lengths may differ in streaming mode)
        mine = [p["caption"] for kind, _, p in stream.iter_rows(0, rank=r, world_size=2, seed=0) if kind == "pair"]
        got = take(PairLoader(stream, PairTransform(8, caption_dropout=0.0), 1, rank=r, world_size=2), len(mine))
        assert [c for b in got for c in b["captions"]] == mine
        caps += mine
    assert len(set(caps)) == len(caps) == 10


def test_max_samples(tiny, tmp_path):
    pairs = load_pairs(tiny, max_samples=16, cache_dir=str(tmp_path))
    assert pairs.num_rows == 16 and len(pairs) == 14  # rows 7 and 15 are ties
    stream = load_pairs(tiny, streaming=True, max_samples=16)
    (batch,) = take(PairLoader(stream, PairTransform(8), 14), 1)
    assert len(batch["captions"]) == 14


def test_tiny_dataset_is_deterministic_pickapic_format(tmp_path):
    a = pq.read_table(write_tiny_pickapic(tmp_path / "a.parquet", num_pairs=24, resolution=16, seed=3))
    b_path = write_tiny_pickapic(str(tmp_path / "b") + "/", num_pairs=24, resolution=16, seed=3)
    assert b_path.endswith("/b/train-00000-of-00001.parquet")
    b = pq.read_table(b_path)
    assert write_tiny_pickapic(tmp_path / "d.tmp-1", num_pairs=4) == str(tmp_path / "d.tmp-1")  # a file
    c = pq.read_table(write_tiny_pickapic(tmp_path / "c.parquet", num_pairs=24, resolution=16, seed=4))
    assert a.equals(b) and not a.equals(c)
    assert set(data.REQUIRED_COLUMNS) <= set(a.column_names)
    assert a.schema.field("jpg_0").type == pa.binary() and a.schema.field("label_0").type == pa.float64()
    t = a.to_pylist()
    assert sum(r["label_0"] == 0.5 for r in t) == 3 and {r["label_0"] for r in t} == {0.0, 0.5, 1.0}
    for r in t:  # the winner is the smooth image of the caption's colour
        if r["label_0"] == 0.5:
            continue
        win = np.asarray(Image.open(io.BytesIO(r["jpg_0" if r["label_0"] == 1.0 else "jpg_1"])), np.float32)
        lose = np.asarray(Image.open(io.BytesIO(r["jpg_1" if r["label_0"] == 1.0 else "jpg_0"])), np.float32)
        assert np.abs(np.diff(win, axis=1)).mean() < 10 < np.abs(np.diff(lose, axis=1)).mean()
        colour = np.array(TINY_COLOURS[r["caption"].split()[1]], np.float32)
        assert np.abs(win.mean(axis=(0, 1)) - colour).max() < 12


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "I;16"])  # (older Pillows open 16-bit PNGs as "I")
def test_every_png_mode_decodes_to_the_picture_it_holds(mode):
    """A grey ramp saved in each PNG mode decodes to the same 8-bit RGB ramp (16-bit grayscale scaled by 257,
    not clipped to white)."""
    ramp = np.tile(np.arange(0, 256, 17, dtype=np.uint8), (4, 1))  # 0, 17, ..., 255
    if mode == "I;16":
        image = Image.fromarray(ramp.astype(np.uint16) * 257)
    else:
        image = Image.fromarray(ramp, mode="L").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    decoded = np.asarray(data.decode_image(buffer.getvalue()))
    assert decoded.shape == (4, 16, 3)
    assert np.abs(decoded[..., 0].astype(int) - ramp).max() <= 1, mode
