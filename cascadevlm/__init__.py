"""cascadevlm: CLIP -> entropy gate -> LVLM cascades for fine-grained image classification."""

__version__ = "0.1.0"
