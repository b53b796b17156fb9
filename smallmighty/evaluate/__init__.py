"""Evaluation: speed and footprint measurements, the TF-IDF baseline, perplexity, and the teacher-vs-student report card."""
