"""LatentForge: a versioned, orchestrated pipeline for compact latent image tokenizers."""

__version__ = "0.1.0"
