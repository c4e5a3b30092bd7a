"""MFPO itself, without the engine: what the pipeline's stages, the trainer, eval and publishing share.

The method (imports nothing of `pipeline` but its error type and strict config base, nothing of `stages`):
  vlm     prompts, answer spans, answer log-probs and entropy, loading a vision-language model
  models  a model's config (Hub id or path, revision, precision, trust), dtypes, one-line load errors
  text    text as data (a special token's string in a question is text, never markup)
  masks   masks as COCO RLE, boxes
  noise   region-only forward-diffusion noise, soft edges, the composite, random regions
  loss    the MFPO loss
  plots   headless figures with reproducible PNG bytes

Its applications, one floor up (they import the method and the engine, never each other's internals):
  train    the curriculum trainer, prefix-shared forward, training-folder layout and records, Ray Train, card
  eval     metrics, evaluate, generate (reads train's folder layout, records and card)
  publish  the column contract, dataset card, preview, plots, push to the Hub
"""
