"""unlearn-exp: concept unlearning, safety guidance and concept inversion for text-to-image diffusion."""

__version__ = "0.1.0"
