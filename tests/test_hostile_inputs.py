"""No input crashes a run: a hostile corpus, every hostile row between two good rows, through the weight-free
data path (ingest -> keywords -> ground from shipped annotations -> GrabCut -> diffusion noise -> write).

Each kind in CASES is either kept (and, where it needs one, repaired: the repair is asserted below) or
quarantined with a reason that names it (`kind: details`, prefix asserted), at the stage that can tell. Every
good row survives and the run exits 0. Config-level cases (YAML alias bomb, recursive aliases, nesting) and
the run that quarantines everything are separate small tests.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time
import tracemalloc
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import cli, dataset_rows, encode, grabcut_stages, photo, png_with_size, quarantine, write_config
from PIL import Image, ImageCms

from pipeline.config import load_config
from pipeline.errors import ConfigError

W, H = 64, 48
GOOD_ANNOTATIONS = [{"label": "disc", "box": [16, 12, 48, 36]}]
BIG_ID = 10**200  # an integer id of 201 digits: kept, under a hash of its digits (ids are at most 128 characters)
BIG_ID_SID = "h" + hashlib.sha256(str(BIG_ID).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Case:
    kind: str
    outcome: str  # "kept" (see the checks of kept rows) or "quarantined"
    reason: str = ""  # the quarantine reason's prefix
    stage: str = "ingest"  # where it is quarantined
    sid: str | None = None  # its sample_id where that is not the kind (ids that are themselves hostile)


# kind -> outcome. The source line of each kind is built in `_line` (the same order).
CASES = [
    # --- the file and its lines
    Case("bom", "kept"),  # UTF-8 BOM before the first row: dropped, the row kept (question checked)
    Case("crlf", "kept"),  # a line ending in \r\n
    Case("deep_nesting", "quarantined", "bad row: line {line} nests deeper than 64 levels", sid="row"),
    Case("deep_field", "quarantined", "bad row: line {line} nests deeper than 64 levels", sid="row"),
    Case("huge_int_literal", "quarantined", "bad row: line {line} is not usable JSON (Exceeds the limit", sid="row"),
    Case("array_line", "quarantined", "bad row: line {line} is not a JSON object (got list)", sid="row"),
    Case("bare_string_line", "quarantined", "bad row: line {line} is not a JSON object (got str)", sid="row"),
    Case("bare_number_line", "quarantined", "bad row: line {line} is not a JSON object (got int)", sid="row"),
    Case("trailing_garbage", "quarantined", "bad row: line {line} is not valid JSON (Extra data", sid="row"),
    # --- ids
    Case("id_list", "quarantined", "bad field: id column 'idx' must be text or an integer, got list", sid="row"),
    Case("id_dict", "quarantined", "bad field: id column 'idx' must be text or an integer, got dict", sid="row"),
    Case("id_bool", "quarantined", "bad field: id column 'idx' must be text or an integer, got bool", sid="row"),
    Case("id_fraction", "quarantined", "bad field: id column 'idx' must be text or an integer, got 1.5", sid="row"),
    Case("id_integral_float", "kept", sid="7000"),  # 7000.0 is the integer id 7000
    Case("id_huge_int", "kept", sid=BIG_ID_SID),
    Case("duplicate_id", "quarantined", "duplicate: sample_id 'good-3' already used", sid="good-3"),
    # --- text fields
    Case("question_number", "quarantined", "bad field: question must be text, got int"),
    Case("chosen_list", "quarantined", "bad field: chosen must be text, got list"),
    Case("rejected_dict", "quarantined", "bad field: rejected must be text, got dict"),
    Case("text_not_object", "quarantined", "bad field: text must be a JSON object"),
    Case("text_deep", "quarantined", "bad field: text nests deeper than 64 levels"),
    Case("text_huge_int", "quarantined", "bad field: text is not usable JSON"),
    Case("nul_in_text", "quarantined", "text: question contains a NUL character"),
    Case("lone_surrogate", "quarantined", "text: chosen is not valid UTF-8 (lone surrogate)"),
    Case("control_chars", "kept"),  # ESC and form feed removed (question checked)
    Case("very_long_text", "quarantined", "text: chosen has 1000000 characters (max_text_chars=20000)"),
    Case("rtl_emoji", "kept"),  # kept exactly
    Case("identical_pair", "quarantined", "bad pair: chosen and rejected are identical"),
    # --- text as a reader sees it: NFC, invisible characters, the LLaVA image marker, the length limit
    Case("nfd_identical_pair", "quarantined", "bad pair: chosen and rejected are identical"),  # NFC vs NFD
    Case("zero_width_identical_pair", "quarantined", "bad pair: chosen and rejected are identical"),
    Case("bidi_marks_identical_pair", "quarantined", "bad pair: chosen and rejected are identical"),
    Case("invisible_question", "quarantined", "missing field: question is empty (only invisible characters)"),
    Case("invisible_answer", "quarantined", "missing field: rejected is empty (only invisible characters)"),
    Case("nfd_question", "kept"),  # stored NFC, counted in meta
    Case("invisible_in_question", "kept"),  # zero-width space and soft hyphen removed, counted in meta
    Case("llava_image_marker", "kept"),  # "<image>\n" before the question: the source's own marker, removed
    Case("image_token_in_text", "kept"),  # any other "<image>" is text, kept as written
    Case("max_text_chars_exact", "kept"),  # exactly 20,000 characters: kept whole
    Case("max_text_chars_after_cleanup", "kept"),  # 20,000 visible + invisible ones: the limit counts what stays
    Case("max_text_chars_plus_one", "quarantined", "text: chosen has 20001 characters (max_text_chars=20000)"),
    # --- the image field: types, text in place of bytes, paths
    Case("image_int", "quarantined", "bad field: image must be bytes, a data URI or a path, got int"),
    Case("image_list", "quarantined", "bad field: image must be bytes, a data URI or a path, got list"),
    Case("image_dict_no_data", "quarantined", "missing field: image"),
    Case("image_bytes_int", "quarantined", "bad field: image bytes must be binary or base64 text, got int"),
    Case("base64_plain", "kept"),  # {"bytes": plain base64}: decoded (pixels checked)
    Case("base64_data_uri", "kept"),  # {"bytes": "data:image/png;base64,..."}: decoded
    Case("data_uri_as_image", "kept"),  # "image": "data:image/jpeg;base64,...": decoded
    Case("base64_invalid", "quarantined", "image: image bytes given as text are not valid plain base64"),
    Case("data_uri_not_image", "quarantined", "image: data URI holds 'text/plain', not an image"),
    Case("data_uri_not_base64", "quarantined", "image: data URI is not base64-encoded"),
    Case("base64_not_an_image", "quarantined", "image: not a decodable image"),
    Case("empty_bytes_beside_path", "quarantined", "image: empty bytes (0 bytes); the path beside them is not read"),
    Case("path_with_nul", "quarantined", "image: path 'images/go\\x00od.jpg' contains a NUL byte"),
    Case("path_too_long", "quarantined", "image: path is too long for the file system (5004 characters"),
    Case("path_is_folder", "quarantined", "image: path 'images' is a folder, not a file"),
    Case("symlink_escape", "quarantined", "image: path 'images/escape.jpg' is outside the image folder"),
    # --- image content
    Case("zero_byte_file", "quarantined", "image: empty file (0 bytes)"),
    Case("truncated_png", "quarantined", "image: truncated or corrupt data"),
    Case("absurd_declared_size", "quarantined", "image: decompression bomb refused before decoding"),
    Case("zero_declared_size", "quarantined", "image: not a decodable image"),
    Case("float_unit_range", "kept"),  # float TIFF in [0, 1]: scaled by 255, not black
    Case("float_255_range", "kept"),  # float TIFF in [0, 255]: kept as is
    Case("float_nan", "quarantined", "image: floating-point image has NaN or infinite pixels"),
    Case("float_out_of_range", "quarantined", "image: floating-point pixels span [-5, 1000]"),
    Case("wrong_extension", "kept"),  # PNG bytes named .jpg: the content decides
    Case("animated_gif", "kept"),  # the first frame
    Case("rgba", "kept"),  # alpha over white
    Case("grayscale", "kept"),
    Case("one_bit", "kept"),
    Case("la_mode", "kept"),  # grey + alpha over white
    Case("icc_profile", "kept"),  # bytes kept as they came, profile included
    # --- shipped annotations (ground backend `annotations`)
    Case("ann_box_strings", "quarantined", 'annotations: box ["0", "0", "10", "10"] must be a list of 4', "ground"),
    Case("ann_box_text", "quarantined", 'annotations: box "0,0,10,10" must be a list of 4 numbers', "ground"),
    Case("ann_box_three", "quarantined", "annotations: box [0, 0, 10] must be a list of 4 numbers", "ground"),
    Case("ann_box_nan", "quarantined", "annotations: box [NaN, 0, 10, 10] has a NaN, infinite", "ground"),
    Case("ann_box_inf", "quarantined", "annotations: box [0, 0, Infinity, 10] has a NaN, infinite", "ground"),
    Case("ann_box_huge_int", "quarantined", "annotations: box [0, 0, 1000", "ground"),
    Case("ann_score_nan", "quarantined", "annotations: score NaN must be a finite number", "ground"),
    Case("ann_score_text", "quarantined", 'annotations: score "high" must be a finite number', "ground"),
    Case("ann_box_outside", "quarantined", "annotations: box [100, 100, 120, 120] lies outside the 64x48", "ground"),
    Case("ann_box_zero_area", "quarantined", "annotations: box [10, 10, 10, 30] has zero area", "ground"),
    Case("ann_box_reversed", "quarantined", "annotations: box [40, 30, 10, 5] is reversed", "ground"),
    Case("ann_not_a_list", "quarantined", "annotations: meta field 'annotations' must be a list, got dict", "ground"),
    Case("ann_label_dict", "quarantined", "annotations: label must be text, got dict", "ground"),
    Case("ann_partly_outside", "kept"),  # clipped to the image
]


def _row(kind: str, image: Any = "images/good.jpg", annotations: Any = None, **text: Any) -> dict[str, Any]:
    fields = {"question": f"What colour is the disc ({kind})?", "chosen": "It is red.", "rejected": "It is blue."}
    fields.update(text)
    return {
        "idx": kind,
        "image": image,
        "text": json.dumps(fields),
        "annotations": GOOD_ANNOTATIONS if annotations is None else annotations,
    }


def _ann(kind: str, **ann: Any) -> dict[str, Any]:
    return _row(kind, annotations=[{"label": "disc", **ann}])


def _float_tiff(arr: np.ndarray) -> bytes:
    return encode(Image.fromarray(arr.astype(np.float32), "F"), "TIFF")


def _gradient() -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    return (xx + yy) / (W + H - 2)  # 0..1


def _images() -> dict[str, bytes]:
    """The picture files of the corpus (under images/)."""
    rgba = Image.new("RGBA", (W, H), (0, 0, 255, 0))
    rgba.paste((0, 255, 0, 255), (W // 2, 0, W, H))  # left half transparent blue, right half opaque green
    one_bit = Image.new("1", (W, H), 0)
    one_bit.paste(1, (0, 0, W // 2, H))
    frames = [Image.new("RGB", (W, H), c) for c in ((255, 0, 0), (0, 255, 0))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    bad = np.full((H, W), 0.5, np.float32)
    bad[0, 0] = np.nan
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    png = encode(photo(W, H, seed=3), "PNG")
    return {
        "good.jpg": encode(photo(W, H, seed=1), quality=90),
        "zero.jpg": b"",
        "truncated.png": png[: len(png) // 2],
        "absurd.png": png_with_size(2**31 - 1, 2**31 - 1),
        "zero_size.png": png_with_size(0, 0),
        "float_unit.tif": _float_tiff(_gradient()),
        "float_255.tif": _float_tiff(_gradient() * 255),
        "float_nan.tif": _float_tiff(bad),
        "float_range.tif": _float_tiff(_gradient() * 1005 - 5),
        "png_named.jpg": png,
        "animated.gif": gif.getvalue(),
        "rgba.png": encode(rgba, "PNG"),
        "gray.png": encode(Image.fromarray(np.rint(_gradient() * 255).astype(np.uint8), "L"), "PNG"),
        "one_bit.png": encode(one_bit, "PNG"),
        "la.png": encode(Image.new("LA", (W, H), (100, 128)), "PNG"),
        "icc.jpg": encode(photo(W, H, seed=4), quality=95, icc_profile=srgb),
    }


def _line(kind: str) -> str:
    """The source line of one hostile kind."""
    png = encode(photo(W, H, seed=3), "PNG")
    jpeg = encode(photo(W, H, seed=5), quality=90)
    b64 = base64.b64encode(png).decode()
    raw = {
        "deep_nesting": "[" * 100_000 + "]" * 100_000,
        "huge_int_literal": '{"idx": ' + "9" * 5000 + ', "image": "images/good.jpg"}',
        "array_line": "[1, 2, 3]",
        "bare_string_line": '"just a string"',
        "bare_number_line": "42",
        "trailing_garbage": json.dumps(_row(kind)) + " trailing words",
        "crlf": json.dumps(_row(kind, question="CRLF row: what is shown?")) + "\r",
    }
    if kind in raw:
        return raw[kind]
    deep: Any = "bottom"
    for _ in range(200):
        deep = [deep]
    rows: dict[str, dict[str, Any]] = {
        "deep_field": {**_row(kind), "extra": deep},
        "id_list": {**_row(kind), "idx": [1, 2]},
        "id_dict": {**_row(kind), "idx": {"a": 1}},
        "id_bool": {**_row(kind), "idx": True},
        "id_fraction": {**_row(kind), "idx": 1.5},
        "id_integral_float": {**_row(kind), "idx": 7000.0},
        "id_huge_int": {**_row(kind), "idx": BIG_ID},
        "duplicate_id": {**_row(kind), "idx": "good-3"},
        "question_number": _row(kind, question=42),
        "chosen_list": _row(kind, chosen=["It", "is", "red."]),
        "rejected_dict": _row(kind, rejected={"text": "It is blue."}),
        "text_not_object": {**_row(kind), "text": json.dumps([1, 2])},
        "text_deep": {**_row(kind), "text": "[" * 100_000 + "]" * 100_000},
        "text_huge_int": {**_row(kind), "text": '{"question": ' + "7" * 5000 + "}"},
        "nul_in_text": _row(kind, question="What is\x00 this?"),
        "lone_surrogate": _row(kind, chosen="It is \ud800 red."),
        "control_chars": _row(kind, question="What\x1b colour\x0c is the\x07 disc?"),
        "very_long_text": _row(kind, chosen="x" * 1_000_000),
        "rtl_emoji": _row(kind, question="ما لون القرص؟ 🔴🧑‍🚀 What colour?"),
        "identical_pair": _row(kind, chosen="It is  red.", rejected="  It is red.\n"),
        "nfd_identical_pair": _row(
            kind, chosen="A café crème.", rejected=unicodedata.normalize("NFD", "A café crème.")
        ),
        "zero_width_identical_pair": _row(kind, chosen="It is red.", rejected="It is\u200b red\u200d.\ufeff"),
        "bidi_marks_identical_pair": _row(kind, chosen="It is red.", rejected="\u200fIt is\u2060 red.\u202c"),
        "invisible_question": _row(kind, question="\u200b\u200d \ufeff\u2060"),
        "invisible_answer": _row(kind, rejected="\u200b\u00ad"),
        "nfd_question": _row(kind, question=unicodedata.normalize("NFD", "Qu'y a-t-il à côté du café ?")),
        "invisible_in_question": _row(kind, question="What\u200b colour is the dis\u00adc?"),
        "llava_image_marker": _row(kind, question="<image>\nWhat colour is the disc?"),
        "image_token_in_text": _row(kind, question="Is <image> written on it?", chosen="It reads <image>, in red."),
        "max_text_chars_exact": _row(kind, chosen="r" * 20_000),
        "max_text_chars_after_cleanup": _row(kind, chosen="r" * 10_000 + "\u200b" * 5 + "r" * 10_000),
        "max_text_chars_plus_one": _row(kind, chosen="r" * 20_001),
        "image_int": _row(kind, image=5),
        "image_list": _row(kind, image=["images/good.jpg"]),
        "image_dict_no_data": _row(kind, image={"format": "jpeg"}),
        "image_bytes_int": _row(kind, image={"bytes": 12, "path": None}),
        "base64_plain": _row(kind, image={"bytes": b64, "path": None}),
        "base64_data_uri": _row(kind, image={"bytes": f"data:image/png;base64,{b64}", "path": "x.png"}),
        "data_uri_as_image": _row(kind, image="data:image/jpeg;base64," + base64.b64encode(jpeg).decode()),
        "base64_invalid": _row(kind, image={"bytes": "this is not base64!", "path": None}),
        "data_uri_not_image": _row(kind, image="data:text/plain;base64," + base64.b64encode(b"hello").decode()),
        "data_uri_not_base64": _row(kind, image="data:image/png,%89PNG"),
        "base64_not_an_image": _row(kind, image={"bytes": base64.b64encode(b"hello world").decode(), "path": None}),
        "empty_bytes_beside_path": _row(kind, image={"bytes": "", "path": "images/good.jpg"}),
        "path_with_nul": _row(kind, image="images/go\x00od.jpg"),
        "path_too_long": _row(kind, image="a" * 5000 + ".jpg"),
        "path_is_folder": _row(kind, image="images"),
        "symlink_escape": _row(kind, image="images/escape.jpg"),
        "zero_byte_file": _row(kind, image="images/zero.jpg"),
        "truncated_png": _row(kind, image="images/truncated.png"),
        "absurd_declared_size": _row(kind, image="images/absurd.png"),
        "zero_declared_size": _row(kind, image="images/zero_size.png"),
        "float_unit_range": _row(kind, image="images/float_unit.tif"),
        "float_255_range": _row(kind, image="images/float_255.tif"),
        "float_nan": _row(kind, image="images/float_nan.tif"),
        "float_out_of_range": _row(kind, image="images/float_range.tif"),
        "wrong_extension": _row(kind, image="images/png_named.jpg"),
        "animated_gif": _row(kind, image="images/animated.gif"),
        "rgba": _row(kind, image="images/rgba.png"),
        "grayscale": _row(kind, image="images/gray.png"),
        "one_bit": _row(kind, image="images/one_bit.png"),
        "la_mode": _row(kind, image="images/la.png"),
        "icc_profile": _row(kind, image="images/icc.jpg"),
        "ann_box_strings": _ann(kind, box=["0", "0", "10", "10"]),
        "ann_box_text": _ann(kind, box="0,0,10,10"),
        "ann_box_three": _ann(kind, box=[0, 0, 10]),
        "ann_box_nan": _ann(kind, box=[float("nan"), 0, 10, 10]),
        "ann_box_inf": _ann(kind, box=[0, 0, float("inf"), 10]),
        "ann_box_huge_int": _ann(kind, box=[0, 0, 10**400, 10]),
        "ann_score_nan": _ann(kind, box=[8, 8, 40, 30], score=float("nan")),
        "ann_score_text": _ann(kind, box=[8, 8, 40, 30], score="high"),
        "ann_box_outside": _ann(kind, box=[100, 100, 120, 120]),
        "ann_box_zero_area": _ann(kind, box=[10, 10, 10, 30]),
        "ann_box_reversed": _ann(kind, box=[40, 30, 10, 5]),
        "ann_not_a_list": _row(kind, annotations={"label": "disc", "box": [8, 8, 40, 30]}),
        "ann_label_dict": _row(kind, annotations=[{"label": {"name": "disc"}, "box": [8, 8, 40, 30]}]),
        "ann_partly_outside": _ann(kind, box=[-10, -10, 30, 30]),
    }
    return json.dumps(rows[kind])  # NaN and Infinity are written as JavaScript literals, as many tools do


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("hostile")
    data = root / "data"
    (data / "images").mkdir(parents=True)
    for name, content in _images().items():
        (data / "images" / name).write_bytes(content)
    (root / "outside.jpg").write_bytes(encode(photo(W, H, seed=9)))
    (data / "images" / "escape.jpg").symlink_to(root / "outside.jpg")

    lines: list[str] = []
    expected: dict[str, tuple[Case, str]] = {}  # sample_id -> (case, reason prefix)
    good: list[str] = []
    for n, case in enumerate(CASES):
        if case.kind == "bom":
            lines.append(json.dumps(_row("bom", question="BOM row: what is shown?")))
        else:
            lines.append(_line(case.kind))
        index = len(lines) - 1
        sid = f"row-{index}" if case.sid == "row" else (case.sid or case.kind)
        expected[sid] = (case, case.reason.format(line=index + 1))
        good.append(f"good-{n}")
        lines.append(json.dumps({**_row(good[-1]), "idx": good[-1]}))  # after every hostile row
    text = "\n".join(lines) + "\n"
    source = data / "train.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8", "surrogatepass"))
    out = root / "out"
    cfg = write_config(root / "cfg.yaml", source, out, stages=grabcut_stages(source), shard_size=40)
    start = time.monotonic()
    proc = cli("run", str(cfg))
    elapsed = time.monotonic() - start
    rows = {r["sample_id"]: r for r in dataset_rows(out)} if proc.returncode == 0 else {}
    return {"proc": proc, "out": out, "rows": rows, "expected": expected, "good": good, "elapsed": elapsed}


def test_corpus_is_large_and_outcomes_are_declared():
    kinds = [c.kind for c in CASES]
    assert len(set(kinds)) == len(kinds) >= 40
    assert all(c.outcome in ("kept", "quarantined") and (c.outcome == "kept") != bool(c.reason) for c in CASES)


@pytest.mark.slow
def test_run_exits_zero_and_every_good_row_survives(run):
    assert run["proc"].returncode == 0, run["proc"].stderr[-3000:]
    rows = run["rows"]
    assert sum(sid.startswith("good-") for sid in rows) == len(run["good"])
    kept = {sid for sid, (case, _) in run["expected"].items() if case.outcome == "kept"}
    assert set(rows) == set(run["good"]) | kept
    assert all(r["rejected_image"] is not None for r in rows.values())  # every kept row got its m'


def test_each_hostile_row_quarantined_with_its_reason(run):
    out = run["out"]
    found = {stage: quarantine(out, stage) for stage in ("ingest", "keywords", "ground", "segment", "perturb")}
    wanted = {sid: (case, prefix) for sid, (case, prefix) in run["expected"].items() if case.outcome == "quarantined"}
    for sid, (case, prefix) in wanted.items():
        reasons = found[case.stage].get(sid)
        assert reasons and len(reasons) == 1 and reasons[0].startswith(prefix), (case.kind, prefix, reasons)
        assert "\n" not in reasons[0] and len(reasons[0]) < 400, (case.kind, reasons)  # one readable line
    got = {(stage, sid) for stage, by_id in found.items() for sid in by_id}
    assert got == {(case.stage, sid) for sid, (case, _) in wanted.items()}  # nothing else was quarantined


def test_repairs_of_kept_rows(run):
    rows = run["rows"]

    def pixels(sid: str) -> np.ndarray:
        img = rows[sid]["images"][0]
        assert img.mode == "RGB" and img.size == (W, H), (sid, img.mode, img.size)
        return np.asarray(img).astype(int)

    assert rows["bom"]["question"] == "BOM row: what is shown?"  # the BOM did not cost the first row
    assert rows["crlf"]["question"] == "CRLF row: what is shown?"
    assert rows["control_chars"]["question"] == "What colour is the disc?"
    assert rows["rtl_emoji"]["question"] == "ما لون القرص؟ 🔴🧑‍🚀 What colour?"  # the joiner inside 🧑‍🚀 stays
    assert "_ingest" not in json.loads(rows["rtl_emoji"]["meta"])  # nothing was changed
    assert rows["nfd_question"]["question"] == unicodedata.normalize("NFC", "Qu'y a-t-il à côté du café ?")
    assert json.loads(rows["nfd_question"]["meta"])["_ingest"] == {"question": {"nfc": True}}
    assert rows["invisible_in_question"]["question"] == "What colour is the disc?"
    assert json.loads(rows["invisible_in_question"]["meta"])["_ingest"] == {"question": {"invisible_removed": 2}}
    assert rows["llava_image_marker"]["question"] == "What colour is the disc?"
    assert json.loads(rows["llava_image_marker"]["meta"])["_ingest"] == {"question": {"image_marker_removed": True}}
    assert rows["image_token_in_text"]["question"] == "Is <image> written on it?"
    assert rows["image_token_in_text"]["chosen_text"] == "It reads <image>, in red."
    assert rows["max_text_chars_exact"]["chosen_text"] == "r" * 20_000
    assert rows["max_text_chars_after_cleanup"]["chosen_text"] == "r" * 20_000
    assert json.loads(rows["7000"]["meta"])["annotations"] == GOOD_ANNOTATIONS
    assert BIG_ID_SID in rows
    png_pixels = np.asarray(photo(W, H, seed=3)).astype(int)
    assert np.array_equal(pixels("base64_plain"), png_pixels)
    assert np.array_equal(pixels("base64_data_uri"), png_pixels)
    assert np.array_equal(pixels("wrong_extension"), png_pixels)
    jpeg = np.asarray(Image.open(io.BytesIO(encode(photo(W, H, seed=5), quality=90))).convert("RGB")).astype(int)
    assert np.array_equal(pixels("data_uri_as_image"), jpeg)
    unit = np.rint(_gradient() * 255).astype(int)
    assert pixels("float_unit_range").mean() > 100  # not black
    assert np.abs(pixels("float_unit_range") - unit[..., None]).max() <= 1
    assert np.abs(pixels("float_255_range") - unit[..., None]).max() <= 1
    assert np.all(pixels("animated_gif") == [255, 0, 0])  # the first frame (red), not the second (green)
    rgba = pixels("rgba")
    assert np.all(rgba[:, : W // 2] == 255) and np.all(rgba[:, W // 2 :] == [0, 255, 0])
    gray = pixels("grayscale")
    assert np.array_equal(gray, np.repeat(unit[..., None], 3, axis=-1))
    one_bit = pixels("one_bit")
    assert np.all(one_bit[:, : W // 2] == 255) and np.all(one_bit[:, W // 2 :] == 0)
    assert np.abs(pixels("la_mode") - (100 * 128 + 255 * 127) / 255).max() <= 1
    icc = rows["icc_profile"]["images"][0]
    assert icc.info.get("icc_profile")  # stored as it came: the profile travels with the bytes
    assert rows["ann_partly_outside"]["boxes"] == [[0.0, 0.0, 30.0, 30.0]]
    assert rows["good-0"]["boxes"] == [[16.0, 12.0, 48.0, 36.0]]


def test_corpus_runs_fast(run):
    assert run["elapsed"] < 90, f"the corpus took {run['elapsed']:.0f} s"


# ------------------------------------------------------------------------------------------ whole runs
@pytest.mark.slow
def test_all_quarantined_run_exits_1_naming_the_top_reasons(tmp_path: Path):
    """A Parquet source with the wrong column types and empty image bytes: nothing survives, so the run fails
    with one line naming the reasons (and the empty bytes never fell back to the file named beside them)."""
    folder = tmp_path / "src"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "x.jpg").write_bytes(encode(photo(W, H)))  # what a fallback to `path` would read
    good = encode(photo(W, H, seed=2))
    image = [{"bytes": b"", "path": "images/x.jpg"}] * 7 + [{"bytes": good, "path": None}] * 5
    table = pa.table(
        {
            "image": pa.array(image, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "question": pa.array(range(12), pa.int64()),  # numbers, not text
            "chosen": pa.array([["It", "is", "red."]] * 12, pa.list_(pa.string())),
            "rejected": pa.array(["It is blue."] * 12),
        }
    )
    pq.write_table(table, folder / "train.parquet")
    out = tmp_path / "out"
    proc = cli("run", str(write_config(tmp_path / "c.yaml", folder / "train.parquet", out)))
    assert proc.returncode == 1, proc.stderr
    [line] = [ln for ln in proc.stderr.splitlines() if "run produced no rows" in ln]
    assert line == (
        f"error: run produced no rows: all 12 quarantined (image x7, bad field x5); see {out.resolve()}/quarantine/"
    )
    reasons = sorted(r for rs in quarantine(out).values() for r in rs)
    assert reasons[:5] == ["bad field: question must be text, got int"] * 5
    assert all(r.startswith("image: empty bytes (0 bytes)") for r in reasons[5:])


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    ["empty file", "byte-order mark only", "one JSON array as JSONL", "Parquet without the text column"],
)
def test_a_run_with_no_rows_exits_1_with_the_documented_line_and_no_card(tmp_path: Path, case: str):
    """Sources that give no row at all, with the dataset card on (its plots cannot be drawn from nothing):
    exit 1 with `run produced no rows: ...` (an empty source named as such), and no card or pictures."""
    source = tmp_path / ("rows.parquet" if case.startswith("Parquet") else "rows.jsonl")
    if case == "empty file":
        source.write_bytes(b"")
    elif case == "byte-order mark only":
        source.write_bytes(b"\xef\xbb\xbf")
    elif case == "one JSON array as JSONL":
        row = {"image": "a.jpg", "question": "q", "chosen": "a", "rejected": "b"}
        source.write_text(json.dumps([row, row]) + "\n")
    else:
        image = {"bytes": encode(photo(W, H)), "path": None}
        pq.write_table(pa.table({"image": [image] * 3, "idx": [1, 2, 3]}), source)
    out = tmp_path / "out"
    stages = {"ingest": {"source": str(source)}, "write": {"card": True}}
    if case.startswith("Parquet"):
        stages["ingest"]["format"] = "rlhf-v"
    proc = cli("run", str(write_config(tmp_path / "c.yaml", source, out, stages=stages)))
    assert proc.returncode == 1, proc.stderr
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    expected = {
        "empty file": f"the source {source} has no rows",
        "byte-order mark only": f"the source {source} has no rows",
        "one JSON array as JSONL": f"all 1 quarantined (bad row x1); see {out.resolve()}/quarantine/",
        "Parquet without the text column": f"all 3 quarantined (missing field x3); see {out.resolve()}/quarantine/",
    }[case]
    assert line == f"error: run produced no rows: {expected}"
    assert not (out / "dataset" / "README.md").exists() and not (out / "dataset" / "mfpo").exists()
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_broken_json_array_source_is_one_clear_error(tmp_path: Path):
    source = tmp_path / "rows.json"
    source.write_text('[{"image": "a.jpg", "question": "q", "chosen": "a", "rejected": "b"}, {"image": ')
    proc = cli("run", str(write_config(tmp_path / "c.yaml", source, tmp_path / "out")))
    assert proc.returncode == 1
    assert "stages.ingest.source:" in proc.stderr and "is not a valid JSON array" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ config files
def _config_with(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(f"run: {{name: hostile, output_dir: {tmp_path / 'out'}}}\n{body}", encoding="utf-8")
    return path


def test_yaml_alias_bomb_is_refused_fast_and_small(tmp_path: Path):
    """Billion laughs: nine levels of ten aliases each, 10^9 strings once expanded."""
    anchors = ["&a0 [" + ", ".join(["lol"] * 10) + "]"]
    anchors += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    path = _config_with(
        tmp_path, "stages:\n  ingest:\n    source: x.jsonl\n    image:\n      formats: [" + ", ".join(anchors) + "]\n"
    )
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ConfigError, match=r"YAML anchors/aliases expand to more than 100,000 nodes"):
            load_config(path)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.25 and peak < 8 * 2**20, (elapsed, peak)


@pytest.mark.slow
def test_yaml_alias_bomb_exits_2_from_the_command(tmp_path: Path):
    anchors = ["&a0 [" + ", ".join(["lol"] * 10) + "]"]
    anchors += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    path = _config_with(tmp_path, f"x: [{', '.join(anchors)}]\nstages: {{ingest: {{source: x.jsonl}}, write: {{}}}}\n")
    proc = cli("run", str(path))
    assert proc.returncode == 2 and "config error:" in proc.stderr and "alias bomb" in proc.stderr


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("stages: &s {ingest: {source: x.jsonl}, write: *s}\n", "a YAML alias refers to its own anchor"),
        ("stages: " + "[" * 50_000 + "]" * 50_000 + "\n", "the YAML nests too deeply"),
    ],
    ids=["recursive-alias", "deep-nesting"],
)
def test_hostile_yaml_is_a_config_error(tmp_path: Path, body: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(_config_with(tmp_path, body))


def test_ordinary_anchors_still_work(tmp_path: Path):
    body = "stages:\n  ingest: {source: x.jsonl, resources: &r {cpus: 1, batch_size: 4}}\n  write: {resources: *r}\n"
    cfg = load_config(_config_with(tmp_path, body))
    assert cfg.stages["write"].resources.batch_size == 4
