"""Build the tiny random-weight LLaVA-style model the offline recipe scores and trains (no download).

    python examples/make_tiny_vlm.py outputs/models/tiny-llava

It has the real architecture (CLIP vision tower, projector, Qwen2 language model) at toy size, with a
byte-level tokenizer, processor and chat template, saved like a Hub checkpoint; its outputs are
meaningless. With a GPU and the Hub, point `stages.score.model.model` and `train.model.model` at
`llava-hf/llava-1.5-7b-hf` instead (pipeline.yaml).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the builders the tests use

from tiny_models import save_tiny_llava

if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/models/tiny-llava")
    if (target / "config.json").exists():
        print(f"{target} exists")
    else:
        print(f"saved {save_tiny_llava(target)}")
