"""Evaluation of a trained model: does it answer from the image? Measures computed from the pipeline's own
held-out split (preference accuracies, an image-sensitivity probe, POPE-style object questions)."""
