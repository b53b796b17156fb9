"""Evaluation: task metrics, speed and footprint measurements, and the teacher-vs-student report card."""
