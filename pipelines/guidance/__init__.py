"""Classifier guidance: the noise-aware classifier whose gradient steers sampling toward a class (classifier.py)."""
