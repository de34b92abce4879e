"""Built-in example models (weights made deterministically in code, nothing downloaded)."""

from aligner.examples.tiny_vit import example_inputs, tiny_vit

__all__ = ["tiny_vit", "example_inputs"]
