"""Ingest reads every supported layout through the same path a Hub dataset takes (`datasets`)."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import cli, dataset_rows, encode, photo, quarantine, write_config, write_source
from PIL import Image


def _msgs(role: str, text: str, image: bool = False) -> list[dict]:
    content = ([{"type": "image", "text": None}] if image else []) + [{"type": "text", "text": text}]
    return [{"role": role, "content": content}]


@pytest.mark.slow
def test_trl_vision_preference_parquet(tmp_path: Path):
    imgs = [photo(40, 30, seed=i) for i in range(3)]
    ds = datasets.Dataset.from_dict(
        {
            "images": [[imgs[0]], [imgs[1]], [imgs[2], imgs[0]]],
            "prompt": [_msgs("user", f"<image>What is in picture {i}?", image=True) for i in range(3)],
            "chosen": [_msgs("assistant", f"A disc {i}.") for i in range(3)],
            "rejected": [_msgs("assistant", "A horse.") for _ in range(3)],
        },
        features=datasets.Features(
            {
                "images": datasets.List(datasets.Image()),
                "prompt": datasets.List(
                    {
                        "role": datasets.Value("string"),
                        "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
                    }
                ),
                "chosen": datasets.List(
                    {
                        "role": datasets.Value("string"),
                        "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
                    }
                ),
                "rejected": datasets.List(
                    {
                        "role": datasets.Value("string"),
                        "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
                    }
                ),
            }
        ),
    )
    src = tmp_path / "trl.parquet"
    ds.to_parquet(str(src))
    out = tmp_path / "out"
    cli("run", str(write_config(tmp_path / "c.yaml", src, out)), check=True)
    rows = dataset_rows(out)
    assert [r["question"] for r in rows] == ["What is in picture 0?", "What is in picture 1?"]
    assert [r["chosen_text"] for r in rows] == ["A disc 0.", "A disc 1."]
    assert np.array_equal(np.asarray(rows[1]["images"][0]), np.asarray(imgs[1]))  # PNG kept losslessly
    [reasons] = quarantine(out).values()
    assert reasons == ["bad field: images has 2 images; MFPO rows need exactly one"]


@pytest.mark.slow
def test_rlaif_v_save_to_disk_with_image_feature(tmp_path: Path):
    jpgs = [encode(photo(48, 32, seed=i), quality=90) for i in range(4)]
    ds = datasets.Dataset.from_dict(
        {
            "idx": [10, 11, 12, 13],
            "image": [{"bytes": b, "path": None} for b in jpgs],
            "question": ["Q0?", "Q1?", "Q2?", "Q3?"],
            "chosen": ["c0", "c1", "c2", "c3"],
            "rejected": ["r0", "r1", "r2", "r3"],
            "origin_dataset": ["VQAv2"] * 4,
        },
        features=datasets.Features(
            {
                "idx": datasets.Value("int64"),
                "image": datasets.Image(),
                "question": datasets.Value("string"),
                "chosen": datasets.Value("string"),
                "rejected": datasets.Value("string"),
                "origin_dataset": datasets.Value("string"),
            }
        ),
    )
    src = tmp_path / "saved"
    ds.save_to_disk(str(src))
    out = tmp_path / "out"
    cli("run", str(write_config(tmp_path / "c.yaml", src, out)), check=True)
    rows = dataset_rows(out)
    assert [r["sample_id"] for r in rows] == ["10", "11", "12", "13"]
    stored = pq.read_table(next((out / "dataset" / "data").glob("*.parquet"))).to_pylist()[0]
    assert stored["images"][0]["bytes"] == jpgs[0]  # clean JPEGs are stored as they came, not re-encoded
    assert stored["images"][0]["path"] is None
    assert rows[0]["meta"] == '{"idx": 10, "origin_dataset": "VQAv2"}'  # untouched source fields
    assert rows[0]["source"] == {"dataset": "saved", "split": "train", "index": 0}


@pytest.mark.slow
def test_shuffle_limit_and_stable_ids(tmp_path: Path):
    src = write_source(tmp_path / "src", 12)

    def ids(rows_expected: bool = True, **ingest) -> list[str]:
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        stages = {"ingest": {"source": str(src), **ingest}, "write": {}}
        proc = cli("run", str(write_config(tmp_path / "c.yaml", src, out, stages=stages)), check=rows_expected)
        if not rows_expected:  # a run that keeps no row fails, naming why
            assert proc.returncode == 1, proc.stderr
            assert "run produced no rows: all 12 quarantined (missing field x12)" in proc.stderr
        files = sorted((out / "dataset" / "data").glob("*.parquet"))
        return [sid for f in files for sid in pq.read_table(f, columns=["sample_id"])["sample_id"].to_pylist()]

    plain = ids()
    assert plain == [str(i) for i in range(12)]
    shuffled = ids(shuffle=True, limit=5)
    assert shuffled == ids(shuffle=True, limit=5)  # same seed, same rows
    assert shuffled != plain[:5] and set(shuffled) <= set(plain)
    # A configured id column that a row lacks quarantines that row, naming the column.
    assert ids(False, id_column="no_such_column") == []
    out = max(tmp_path.glob("out-*"), key=lambda p: p.stat().st_mtime_ns)
    assert quarantine(out)["row-0"] == ["missing field: id column 'no_such_column'"]


@pytest.mark.slow
def test_content_hash_ids_survive_reordering(tmp_path: Path):
    src = write_source(tmp_path / "src", 6)
    lines = src.read_text().splitlines()
    stripped = [ln.replace('"idx": ', '"n": ') for ln in lines]  # no id column any more
    a = tmp_path / "src" / "a.jsonl"
    b = tmp_path / "src" / "b.jsonl"
    a.write_text("\n".join(stripped) + "\n")
    b.write_text("\n".join(reversed(stripped)) + "\n")
    got = []
    for name, path in (("a", a), ("b", b)):
        out = tmp_path / name
        cli("run", str(write_config(tmp_path / f"{name}.yaml", path, out)), check=True)
        got.append({r["chosen_text"] + r["question"]: r["sample_id"] for r in dataset_rows(out)})
    assert got[0] == got[1] and all(v.startswith("h") for v in got[0].values())


@pytest.mark.slow
def test_paths_outside_the_source_folder_are_refused(tmp_path: Path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(encode(photo(), "PNG"))
    folder = tmp_path / "data"
    folder.mkdir()
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": None, "path": str(secret)}], "question": ["q"], "chosen": ["c"], "rejected": ["r"]},
        features=datasets.Features(
            {
                "image": datasets.Image(decode=False),
                "question": datasets.Value("string"),
                "chosen": datasets.Value("string"),
                "rejected": datasets.Value("string"),
            }
        ),
    )
    ds.to_parquet(str(folder / "x.parquet"))
    out = tmp_path / "out"
    proc = cli("run", str(write_config(tmp_path / "c.yaml", folder / "x.parquet", out)))
    assert proc.returncode == 1 and "run produced no rows: all 1 quarantined (image x1)" in proc.stderr
    [reasons] = quarantine(out).values()
    assert "is outside the image folder" in reasons[0]


@pytest.mark.slow
def test_decoded_image_matches_source_pixels(tmp_path: Path):
    src = write_source(tmp_path / "src", 1)
    out = tmp_path / "out"
    cli("run", str(write_config(tmp_path / "c.yaml", src, out)), check=True)
    [row] = dataset_rows(out)
    original = Image.open(io.BytesIO((tmp_path / "src" / "images" / "0.jpg").read_bytes())).convert("RGB")
    assert np.array_equal(np.asarray(row["images"][0]), np.asarray(original))


@pytest.mark.slow
def test_unknown_id_column_of_a_table_source_is_named(tmp_path: Path):
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": encode(photo()), "path": None}], "question": ["q"], "chosen": ["c"], "rejected": ["r"]},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "question": datasets.Value("string"),
                "chosen": datasets.Value("string"),
                "rejected": datasets.Value("string"),
            }
        ),
    )
    ds.to_parquet(str(tmp_path / "x.parquet"))
    stages = {"ingest": {"source": str(tmp_path / "x.parquet"), "id_column": "uid"}, "write": {}}
    proc = cli("run", str(write_config(tmp_path / "c.yaml", tmp_path / "x.parquet", tmp_path / "out", stages=stages)))
    assert proc.returncode == 1
    assert "stages.ingest.id_column: 'uid' is not a column of the source (chosen, image, question, rejected)" in (
        proc.stderr.replace("\n", "")
    )
