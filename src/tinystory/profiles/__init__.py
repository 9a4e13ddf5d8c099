"""Hardware profiles shipped as TOML data (one file a profile)."""
