"""The local and Ray executors write the same files, byte for byte, from the same config."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import cli, encode, quarantine, rlhfv_line, tree, write_config, write_source
from PIL import Image


@pytest.mark.ray
def test_local_and_ray_give_identical_outputs(tmp_path: Path):
    src = write_source(tmp_path / "src", 23)
    (tmp_path / "src" / "images" / "bad.jpg").write_bytes(b"not an image")
    (tmp_path / "src" / "images" / "tiny.png").write_bytes(encode(Image.new("RGB", (2, 2)), "PNG"))
    with open(src, "a", encoding="utf-8") as fh:
        fh.write(rlhfv_line(100, "images/bad.jpg") + "\n" + rlhfv_line(101, "images/tiny.png") + "\n")
    outputs = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        cfg = write_config(tmp_path / f"{executor}.yaml", src, out, executor=executor, shard_size=3)
        proc = cli("run", str(cfg), check=True)
        if executor == "ray":
            assert "Ray actor(s)" in proc.stderr  # it really ran on an actor pool
        outputs[executor] = tree(out)
    assert outputs["local"] == outputs["ray"]
    assert len([k for k in outputs["ray"] if k.startswith("dataset/data/")]) == 9
    assert set(quarantine(tmp_path / "ray")) == {"100", "101"}
