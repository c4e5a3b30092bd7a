"""Run with the groundingdino-py environment's interpreter: writes a random-weight checkpoint of the
package's GroundingDINO SwinT-OGC architecture and a tiny offline BERT text encoder into OUT_DIR.

    .venv-groundingdino/bin/python tests/build_groundingdino_checkpoint.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import groundingdino
import torch
from groundingdino.models import build_model
from groundingdino.util.slconfig import SLConfig
from transformers import BertConfig, BertModel, BertTokenizer

WORDS = ("a an the cat dog person car cup helmet rocket flag clock coin eye saucer spoon camera tripod").split()


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    bert = out / "bert"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", ",", *WORDS]
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list("abcdefghijklmnopqrstuvwxyz")
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(out / "vocab.txt"), do_lower_case=True).save_pretrained(bert)
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    ).save_pretrained(bert)
    args = SLConfig.fromfile(str(Path(groundingdino.__file__).parent / "config" / "GroundingDINO_SwinT_OGC.py"))
    args.device = "cpu"
    args.text_encoder_type = str(bert)
    model = build_model(args)
    torch.save({"model": model.state_dict()}, out / "groundingdino_random.pth")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
