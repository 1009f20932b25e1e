"""Public operators: docstrings with shapes, argument checks, backend choice, fakes."""
