"""Training: one Accelerate loop with atomic checkpoints and exact resume, and `slm finetune` for encoder classifiers."""
