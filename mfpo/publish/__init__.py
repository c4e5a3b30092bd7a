"""Publishing and inspecting a finished MFPO dataset: the column contract, the dataset card with its
preview sheet and plots, the `preview` command's sheet and HTML page, and `push` to the Hugging Face Hub.

It reads what the pipeline wrote (`<output_dir>/dataset/`, `quarantine/`); it never runs a stage.
"""
