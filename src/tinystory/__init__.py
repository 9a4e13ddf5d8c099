"""tinystory-llm: train a small story-telling language model from scratch.

Importing this package imports nothing heavy (no torch, no transformers), so the CLI
starts instantly; the heavy modules are imported by the functions that need them.
"""

__version__ = "0.1.0"
