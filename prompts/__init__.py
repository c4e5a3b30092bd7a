"""Prompt templates (package data): the keywords stage's LLM backend and the eval judge read them by file name
through `importlib.resources`, so an installed wheel finds them as a source checkout does."""
