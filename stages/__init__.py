"""Thin DVC entry points: parse paths, load a params section, call the library once."""
