"""misalign: detect AI-generated images from image-text misalignment in CLIP space."""

__version__ = "0.1.0"
