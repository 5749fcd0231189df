"""pcim: PCIM pixel-attribution maps for high-content-imaging plates."""

__version__ = "0.1.0"
