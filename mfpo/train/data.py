"""What the trainer reads: the finished dataset, memory-mapped through `datasets` (Arrow), one batch of
rows decoded at a time; the collator that turns rows into the three sequences of the MFPO loss; and the
dataset's identity (its fingerprint and the reference model its log-probs came from)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from mfpo.vlm import REFERENCE_KEY, answer_spans, build_prompt, collate, with_answer
from pipeline.determinism import stable_hash
from pipeline.errors import PipelineError
from pipeline.images import decode_rgb

REF_COLUMNS = ("ref_logp_chosen", "ref_logp_rejected", "ref_logp_chosen_noised")
COLUMNS = ("sample_id", "images", "question", "chosen_text", "rejected_text", "rejected_image", "bucket", *REF_COLUMNS)


def shard_files(dataset_dir: Path, split: str = "train") -> list[Path]:
    return sorted((Path(dataset_dir) / "data").glob(f"{split}-*.parquet"))


def splits(dataset_dir: Path) -> set[str]:
    return {p.name.split("-", 1)[0] for p in (Path(dataset_dir) / "data").glob("*.parquet")}


def check_columns(dataset_dir: Path) -> list[Path]:
    files = shard_files(dataset_dir)
    if not files:
        raise PipelineError(
            f"no training shards under {Path(dataset_dir) / 'data'} (train-*.parquet): run the pipeline first"
        )
    missing = [c for c in COLUMNS if c not in pq.read_schema(files[0]).names]
    if missing:
        raise PipelineError(f"the dataset lacks {', '.join(missing)}: add the score and bucket stages before write")
    return files


def require_split(dataset_dir: Path, split: str, key: str = "eval.split") -> None:
    """Refuse, in one line and before any model loads, a split the dataset lacks or that holds no rows."""
    present = splits(dataset_dir)
    if split in present and sum(pq.read_metadata(f).num_rows for f in shard_files(dataset_dir, split)):
        return
    have = ", ".join(sorted(present)) or "none"
    state = f"`{split}` split has no rows" if split in present else f"dataset has no `{split}` split"
    raise PipelineError(
        f"{key}: the {state} (splits: {have}); hold rows out with stages.write.splits "
        "(e.g. {train: 0.95, test: 0.05}: a 5% split gets a row from about 20 distinct pictures up), or set eval.split"
    )


def read_reference(dataset_dir: Path) -> dict[str, Any] | None:
    """The score stage's record of its reference model, from the dataset's Parquet schema metadata."""
    files = check_columns(dataset_dir)
    raw = (pq.read_schema(files[0]).metadata or {}).get(REFERENCE_KEY.encode())
    return json.loads(raw) if raw else None


def dataset_fingerprint(dataset_dir: Path, shard_hashes: list[str] | None = None) -> str:
    """Identity of the training data: the sha256 of every shard (from the pipeline's commit records when the
    dataset is this run's own, else read from the files)."""
    if shard_hashes is None:
        shard_hashes = []
        for f in sorted((Path(dataset_dir) / "data").glob("*.parquet")):
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda fh=fh: fh.read(1 << 24), b""):
                    h.update(chunk)
            shard_hashes.append(f"{f.name}:{h.hexdigest()}")
    return stable_hash(shard_hashes, length=16)


def open_split(dataset_dir: Path, split: str, cache_dir: Path, columns: tuple[str, ...] = COLUMNS) -> Any:
    """The split as a memory-mapped `datasets.Dataset` of `columns` (default: those training needs); images
    stay encoded."""
    import datasets

    files = [str(f) for f in shard_files(dataset_dir, split)]
    if not files:
        raise PipelineError(f"no `{split}` split under {Path(dataset_dir) / 'data'}")
    datasets.disable_progress_bars()
    ds = datasets.load_dataset("parquet", data_files={split: files}, split=split, cache_dir=str(cache_dir))
    return ds.select_columns([c for c in columns if c in ds.column_names]).with_format("arrow")


def bucket_indices(ds: Any, order: list[str], all_at_once: bool) -> list[tuple[str, list[int]]]:
    """The curriculum's stages: (bucket, row indices in dataset order)."""
    buckets = ds.data.column("bucket").to_pylist()  # one short column, not the rows
    unknown = set(buckets) - set(order)
    if unknown:
        raise PipelineError(
            f"train.curriculum.order: buckets {sorted(unknown)} of the dataset are not in the order {order}"
        )
    if all_at_once:
        return [("all", list(range(len(buckets))))]
    return [(b, [i for i, x in enumerate(buckets) if x == b]) for b in order]


class RowsDataset(torch.utils.data.Dataset):
    """Rows of a memory-mapped dataset by index; reference log-probs can be overridden (refresh_reference)."""

    def __init__(self, ds: Any, indices: list[int], overrides: dict[str, list[float | None]] | None = None) -> None:
        self.ds = ds
        self.indices = indices
        self.overrides = overrides if overrides is not None else {}

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.ds[self.indices[i]].to_pylist()[0]
        new = self.overrides.get(row["sample_id"])
        if new is not None:
            row.update(zip(REF_COLUMNS, new, strict=True))
        return row


@dataclass
class MFPOCollator:
    """Rows -> one batch of 3B sequences: (y_w | m) x B, then (y_l | m) x B, then (y_w | m') x B."""

    processor: Any
    system_prompt: str | None = None
    dtype: Any = torch.float32  # the policy's weights' dtype: pixels reach the model as the score stage sent them

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        chosen, rejected, noised, has_image, reference = [], [], [], [], []
        for r in rows:
            clean = decode_rgb(r["images"][0])
            dispreferred = decode_rgb(r["rejected_image"]) if r["rejected_image"] is not None else clean
            prompt = build_prompt(self.processor, clean, r["question"], self.system_prompt)  # shared by two answers
            noised_prompt = build_prompt(self.processor, dispreferred, r["question"], self.system_prompt)
            chosen.append(with_answer(self.processor, prompt, r["chosen_text"]))
            rejected.append(with_answer(self.processor, prompt, r["rejected_text"]))
            noised.append(with_answer(self.processor, noised_prompt, r["chosen_text"]))
            has_image.append(r["rejected_image"] is not None and r["ref_logp_chosen_noised"] is not None)
            reference.append([r["ref_logp_chosen"], r["ref_logp_rejected"], r["ref_logp_chosen_noised"] or 0.0])
        examples = chosen + rejected + noised
        tok = self.processor.tokenizer
        batch = collate(
            examples, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, "cpu", self.dtype
        )
        batch["answer_spans"] = answer_spans(examples)
        batch["reference"] = torch.tensor(reference, dtype=torch.float64)
        batch["has_image"] = torch.tensor(has_image)
        return batch
