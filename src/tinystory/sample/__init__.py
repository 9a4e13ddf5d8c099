"""The bundled TinyStories sample (CDLA-Sharing-1.0; see README.md here)."""
