"""Word lists for the noise families and small sample corpora (read with importlib.resources)."""
