"""The data path on real photos: keywords -> ground -> segment -> perturb -> write.

Invariants: outside the mask the dispreferred image equals the original byte for byte; inside, it is
exactly the forward-diffusion formula for the configured t with the row's recorded seed (and its
statistics match); the global fallback fires exactly when nothing was grounded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from contract import _rgb, check
from helpers import SAMPLE_JSONL, alpha_bar, cli, quantised_moments, quarantine, write_config

from mfpo.masks import decode_mask

pytestmark = pytest.mark.slow  # the CLI in subprocesses, Ray or model builds: not in `make test-fast`

T = 500


def make_source(folder: Path, drop_boxes: set[int]) -> Path:
    """The bundled sample, with the annotations of some rows removed (nothing to ground there)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for line in SAMPLE_JSONL.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["idx"] in drop_boxes:
            row["annotations"] = []
        lines.append(json.dumps(row))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run(tmp_path: Path, source: Path, perturb: dict, name: str = "out", **extra: dict) -> Path:
    stages = {
        "ingest": {"source": str(source), "format": "rlhf-v", "image_root": str(SAMPLE_JSONL.parent)},
        "keywords": {},
        "ground": {"backend": "annotations", "annotations": {"select": "all"}},
        "segment": {"backend": "grabcut"},
        "perturb": perturb,
        "write": {},
        **extra,
    }
    out = tmp_path / name
    cfg = write_config(tmp_path / f"{name}.yaml", source, out, stages=stages, shard_size=10)
    cli("run", str(cfg), check=True)
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_source(tmp_path_factory.mktemp("src"), drop_boxes={3, 11, 20})


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory, source: Path):
    root = tmp_path_factory.mktemp("run")
    out = run(root, source, {"method": "diffusion-noise", "noise": {"timestep": T}})
    return check(out)


def test_contract_holds_and_every_row_is_kept(default_run):
    rows, problems = default_run
    assert problems == []
    assert len(rows) == len(SAMPLE_JSONL.read_text().splitlines())
    assert sum(bool(r["key_phrases"]) for r in rows) >= 0.8 * len(rows)  # a few photos name no everyday object


def test_fallback_fires_exactly_when_nothing_was_grounded(default_run):
    rows, _ = default_run
    for r in rows:
        grounded = bool(r["boxes"])
        assert (r["perturbation"]["fallback"] is None) == grounded, r["sample_id"]
        assert r["perturbation"]["method"] == ("diffusion-noise" if grounded else "global-noise")
        if not grounded:
            assert r["mask_area"] == 1.0  # the whole image was noised
    assert {r["sample_id"] for r in rows if not r["boxes"]} == {"3", "11", "20"}


def test_noise_inside_the_mask_is_the_formula(default_run):
    rows, _ = default_run
    abar = alpha_bar(T)
    # Per original level x0, the exact mean and variance of the stored (clipped, quantised) noisy level.
    table = np.array([quantised_moments(math.sqrt(abar) * level / 255, math.sqrt(1 - abar)) for level in range(256)])
    z_scores = []
    for r in rows:
        if r["perturbation"]["fallback"] is not None:
            continue
        img, rej = _rgb(r["images"]).astype(np.float64), _rgb(r["rejected_image"]).astype(np.float64)
        mask = decode_mask(r["mask"])
        eps = np.random.default_rng(r["perturbation"]["seed"]).standard_normal(img.shape).astype(np.float32)
        expected = np.clip(np.rint((math.sqrt(abar) * img / 255 + math.sqrt(1 - abar) * eps) * 255), 0, 255)
        diff = np.abs(expected[mask] - rej[mask])
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, r["sample_id"]  # float rounding at .5 only
        levels = img[mask].astype(int)
        z_scores.append((rej[mask] - table[levels, 0]) / np.sqrt(table[levels, 1]))
    z = np.concatenate(z_scores)
    assert z.size > 50_000
    # Standardised by the formula's own moments, the noise has mean 0 and variance 1 over many pixels.
    assert abs(z.mean()) < 0.02 and abs(z.var() - 1) < 0.03


@pytest.mark.parametrize("method", ["blur", "blackout", "random-region", "global-noise"])
def test_ablations_change_only_their_region(tmp_path: Path, source: Path, method: str):
    out = run(tmp_path, source, {"method": method})
    rows, problems = check(out)
    assert problems == []
    for r in rows:
        assert r["perturbation"]["method"] == ("global-noise" if not r["boxes"] else method)
        if method == "global-noise":
            assert r["mask_area"] == 1.0 and r["perturbation"]["fallback"] is None


def test_random_region_of_a_fixed_fraction(tmp_path: Path, source: Path):
    """The paper's Table 8 ablation: noise on a random rectangle covering 20% of the image."""
    out = run(tmp_path, source, {"method": "random-region", "random_region": {"size": "fraction"}})
    rows, problems = check(out)
    assert problems == []
    areas = [r["mask_area"] for r in rows if r["boxes"]]
    assert areas and all(abs(a - 0.2) < 0.01 for a in areas), areas
    for r in rows:
        if r["boxes"]:
            ys, xs = np.nonzero(decode_mask(r["mask"]))
            assert (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1) == len(ys)  # one rectangle


def test_fallback_skip_and_quarantine(tmp_path: Path, source: Path):
    out = run(tmp_path, source, {"fallback": "skip"}, name="skip")
    rows, problems = check(out)
    assert problems == []
    skipped = {r["sample_id"] for r in rows if r["rejected_image"] is None}
    assert skipped == {"3", "11", "20"}
    assert all(r["perturbation"]["fallback"] == "skip" for r in rows if r["sample_id"] in skipped)

    out = run(tmp_path, source, {"fallback": "quarantine"}, name="quarantine")
    rows, problems = check(out)
    assert problems == [] and len(rows) == len(SAMPLE_JSONL.read_text().splitlines()) - 3
    reasons = quarantine(out, "perturb")
    assert set(reasons) == {"3", "11", "20"}
    assert all(r == ["no region: nothing was grounded for the key phrases"] for r in reasons.values())


def test_masks_cover_the_annotated_objects(default_run):
    """GrabCut from the sample's boxes: each mask lies inside its box and fills a good part of it."""
    rows, _ = default_run
    for r in rows:
        for box, rle in zip(r["boxes"], r["box_masks"], strict=True):
            mask = decode_mask(rle)
            x0, y0, x1, y1 = math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3])
            inside = mask[y0:y1, x0:x1].sum()
            assert inside == mask.sum()  # nothing outside the box
            assert inside >= 0.05 * (x1 - x0) * (y1 - y0)


def test_config_rejects_bad_perturb_keys(tmp_path: Path, source: Path):
    cfg = tmp_path / "c.yaml"
    stages = {
        "ingest": {"source": str(source), "image_root": str(SAMPLE_JSONL.parent)},
        "keywords": {},
        "ground": {"backend": "annotations"},
        "segment": {"backend": "grabcut"},
        "perturb": {"noise": {"timestep": 1000}},
        "write": {},
    }
    cfg.write_text(yaml.safe_dump({"run": {"output_dir": str(tmp_path / "o")}, "stages": stages}))
    proc = cli("run", str(cfg))
    assert proc.returncode == 2 and "stages.perturb.noise: Value error, timestep must be below" in proc.stderr
