"""The story page served by `tinystory serve` (index.html: one file, no build step)."""
