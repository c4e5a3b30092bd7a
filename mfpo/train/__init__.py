"""The bundled MFPO trainer: loss, collator, a transformers Trainer, and the easy-to-hard curriculum.

It reads the dataset the pipeline wrote (`<output_dir>/dataset/`), uses the reference log-probs the
`score` stage stored (so no second model is held), and trains with LoRA (peft) or a full fine-tune.
"""
