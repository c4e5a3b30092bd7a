"""A corpus of bad and odd inputs: each bad row is quarantined with a specific reason, every good row
(odd modes included, converted to RGB) is kept, and the run exits 0."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from helpers import cli, dataset_rows, encode, photo, png_with_size, quarantine, rlhfv_line, write_config
from PIL import Image


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("corpus")
    img = root / "images"
    img.mkdir()
    good = encode(photo(64, 48, seed=1), quality=90)
    files = {
        "good.jpg": good,
        "corrupt.jpg": b"this is not an image at all" + bytes(range(256)) * 4,
        "badheader.jpg": b"\xff\xd8\xff\xe0 a JPEG marker, then garbage" + bytes(range(256)) * 4,
        "truncated.jpg": good[: len(good) // 2],
        "empty.jpg": b"",
        "bomb.png": png_with_size(40_000, 40_000),
        "cmyk.jpg": encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), quality=95),  # red in CMYK
        "sixteen.png": encode(Image.fromarray(np.full((30, 40), 40000, np.uint16)), "PNG"),
        "tiny.png": encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
    }
    pal = Image.new("P", (40, 30), 0)
    pal.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    pal.paste(1, (20, 0, 40, 30))
    files["palette.png"] = encode(pal, "PNG", transparency=0)  # left half transparent, right half green
    rot = photo(60, 30, seed=2)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    files["rotated.jpg"] = encode(rot, quality=95, exif=exif.tobytes())
    for name, data in files.items():
        (img / name).write_bytes(data)
    (root / "outside.jpg").write_bytes(good)

    lines = [
        rlhfv_line(0, "images/good.jpg"),
        rlhfv_line(1, "images/corrupt.jpg"),
        rlhfv_line(2, "images/truncated.jpg"),
        rlhfv_line(3, "images/empty.jpg"),
        rlhfv_line(4, "images/bomb.png"),
        rlhfv_line(5, "images/cmyk.jpg"),
        rlhfv_line(6, "images/sixteen.png"),
        rlhfv_line(7, "images/palette.png"),
        rlhfv_line(8, "images/rotated.jpg"),
        rlhfv_line(9, "images/tiny.png"),
        rlhfv_line(10, "images/good.jpg", question=None),
        '{"idx": 11, "image": "images/good.jpg", "text": "{\\"question\\": \\"caf\xe9?\\", '
        '\\"chosen\\": \\"a\\", \\"rejected\\": \\"b\\"}"}',  # placeholder, replaced by raw bytes below
        rlhfv_line(12, "images/good.jpg", chosen="Also fine."),
        rlhfv_line(12, "images/good.jpg", chosen="Same id again."),
        rlhfv_line(13, "images/missing.jpg"),
        rlhfv_line(14, "../outside.jpg"),
        '{"idx": 15, "image": "images/good.jpg", "text": ',
        rlhfv_line(16, "images/good.jpg", question="   "),
        rlhfv_line(17, "images/badheader.jpg"),
    ]
    raw = [line.encode("utf-8") for line in lines]
    raw[11] = raw[11].replace("caf\xe9".encode(), b"caf\xe9")  # Latin-1 byte: not valid UTF-8
    source = root / "train.jsonl"
    source.write_bytes(b"\n".join(raw) + b"\n")
    out = root / "out"
    cfg = write_config(root / "cfg.yaml", source, out, shard_size=5)
    proc = cli("run", str(cfg))
    return proc, out, cfg


EXPECTED_REASONS = {
    "1": "image: not a decodable image",
    "2": "image: truncated or corrupt data",
    "3": "image: empty file (0 bytes)",
    "4": "image: decompression bomb refused before decoding",
    "9": "image: too small (1x1",
    "10": "missing field: question",
    "row-11": "text: line 12 is not valid UTF-8",
    "12": "duplicate: sample_id '12' already used by source row 12",
    "13": "image: file not found: images/missing.jpg",
    "14": "image: path '../outside.jpg' is outside the image folder",
    "row-16": "bad row: line 17 is not valid JSON",
    "16": "missing field: question is empty",
    "17": "image: corrupt header",
}


def test_exit_code_zero_and_good_rows_kept(corpus):
    proc, out, _ = corpus
    assert proc.returncode == 0, proc.stderr
    rows = {r["sample_id"]: r for r in dataset_rows(out)}
    assert sorted(rows, key=int) == ["0", "5", "6", "7", "8", "12"]
    assert rows["12"]["chosen_text"] == "Also fine."  # the first occurrence of a repeated id wins


def test_each_bad_row_quarantined_with_its_reason(corpus):
    _, out, _ = corpus
    reasons = quarantine(out)
    assert set(reasons) == set(EXPECTED_REASONS)
    for sid, expected in EXPECTED_REASONS.items():
        assert len(reasons[sid]) == 1 and reasons[sid][0].startswith(expected), (sid, reasons[sid])


def test_quarantine_keeps_original_fields_and_payload(corpus):
    import pyarrow.parquet as pq

    _, out, _ = corpus
    rows = [r for f in sorted((out / "quarantine" / "ingest").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    by_id = {r["sample_id"]: r for r in rows}
    truncated = by_id["2"]
    assert json.loads(truncated["fields"])["image"] == "images/truncated.jpg"
    assert truncated["payload"] and truncated["payload"].startswith(b"\xff\xd8")  # the bad bytes, for inspection
    assert "line" in json.loads(by_id["row-11"]["fields"])  # unparseable line: its number and raw text


def test_odd_modes_converted_to_rgb(corpus):
    _, out, _ = corpus
    rows = {r["sample_id"]: r for r in dataset_rows(out)}

    def pixels(sid: str) -> np.ndarray:
        img = rows[sid]["images"][0]
        assert img.mode == "RGB"
        return np.asarray(img)

    cmyk = pixels("5")
    assert cmyk[..., 0].mean() > 200 and cmyk[..., 1:].mean() < 60  # red survives the CMYK conversion
    sixteen = pixels("6")
    assert np.all(sixteen == 40000 >> 8)  # 16-bit scaled to 8-bit, not clipped at 255
    palette = pixels("7")
    assert np.all(palette[:, :20] == 255) and np.all(palette[:, 20:] == [0, 255, 0])  # transparent -> white
    rotated = pixels("8")
    assert rotated.shape == (60, 30, 3)  # EXIF orientation applied: 60x30 landscape shown as portrait
    expected = np.asarray(photo(60, 30, seed=2).transpose(Image.Transpose.ROTATE_270), dtype=float)
    assert np.abs(rotated.astype(float) - expected).mean() < 12  # same picture, rotated (JPEG loss aside)


@pytest.mark.slow
def test_status_counts_quarantine(corpus):
    _, _, cfg = corpus
    proc = cli("status", str(cfg), "--json", check=True)
    ingest = json.loads(proc.stdout)["stages"][0]
    assert ingest["state"] == "done"
    assert (ingest["rows_in"], ingest["rows_kept"], ingest["rows_quarantined"]) == (19, 6, 13)
    assert ingest["reasons"]["image"] == 8


def test_stored_images_decode_without_exif(corpus):
    import pyarrow.parquet as pq

    _, out, _ = corpus
    for f in sorted((out / "ingest").glob("shard-*.parquet")):
        for row in pq.read_table(f, columns=["image"]).to_pylist():
            with Image.open(io.BytesIO(row["image"]["bytes"])) as img:
                assert img.getexif().get(0x0112, 1) == 1
