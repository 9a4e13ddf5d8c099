"""Mistral-7B-v0.1's tokenizer, shipped with the package (see README.md here)."""
