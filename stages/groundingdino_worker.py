"""Worker process for the `groundingdino-py` ground backend (the original GroundingDINO package).

groundingdino-py needs transformers < 5, which the rest of the project cannot use, so it runs in an
environment of its own: `ground` starts this file with that environment's interpreter
(`groundingdino_py.python`) and talks to it over stdin/stdout, one JSON object per line. The file
imports nothing from this project, only the package, torch, numpy and Pillow.

    request:  {"image": "<base64 of the encoded image>", "caption": "cat . dog .",
               "box_threshold": 0.35, "text_threshold": 0.25}
    reply:    {"boxes": [[x0, y0, x1, y1], ...], "scores": [...], "phrases": [...]}   (pixels)
              or {"error": "..."}
    startup:  {"ready": true} once the model is loaded, or {"error": "..."} and exit 1.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from pathlib import Path
from typing import Any


def load(config_file: str, checkpoint: str, text_encoder: str, device: str) -> Any:
    import torch
    from groundingdino.models import build_model
    from groundingdino.util.misc import clean_state_dict
    from groundingdino.util.slconfig import SLConfig

    if not Path(config_file).is_file():  # a name in the package's own config folder
        import groundingdino

        config_file = str(Path(groundingdino.__file__).parent / "config" / config_file)
    args = SLConfig.fromfile(config_file)
    args.device = device
    args.text_encoder_type = text_encoder  # a local directory when offline
    model = build_model(args)
    if checkpoint.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(checkpoint)
    else:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)  # no pickled code
        state = state.get("model", state)
    model.load_state_dict(clean_state_dict(state), strict=True)
    return model.eval().to(device)


def detect(model: Any, request: dict, device: str) -> dict:
    import groundingdino.datasets.transforms as T
    import numpy as np
    from groundingdino.util.inference import predict
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(request["image"]))).convert("RGB")
    w, h = image.size
    transform = T.Compose(
        [T.RandomResize([800], max_size=1333), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    )
    tensor, _ = transform(image, None)
    boxes, scores, phrases = predict(
        model=model,
        image=tensor,
        caption=request["caption"],
        box_threshold=request["box_threshold"],
        text_threshold=request["text_threshold"],
        device=device,
    )
    cx, cy, bw, bh = (boxes.numpy() * np.array([w, h, w, h])).T if len(boxes) else ([], [], [], [])
    xyxy = [
        [float(a - c / 2), float(b - d / 2), float(a + c / 2), float(b + d / 2)]
        for a, b, c, d in zip(cx, cy, bw, bh, strict=True)
    ]
    return {"boxes": xyxy, "scores": [float(s) for s in scores], "phrases": list(phrases)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--text-encoder", required=True)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    out = sys.stdout
    sys.stdout = sys.stderr  # the package prints while building; keep the protocol channel clean
    try:
        model = load(args.config, args.checkpoint, args.text_encoder, args.device)
    except Exception as err:
        out.write(json.dumps({"error": f"{type(err).__name__}: {err}"}) + "\n")
        out.flush()
        sys.exit(1)
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            reply = detect(model, json.loads(line), args.device)
        except Exception as err:
            reply = {"error": f"{type(err).__name__}: {err}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
