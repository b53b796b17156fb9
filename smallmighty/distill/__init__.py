"""Knowledge distillation: losses, cached teacher outputs, augmentation and the classifier distillation recipe."""
