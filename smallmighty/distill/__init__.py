"""Knowledge distillation: losses, layer maps, cached teacher outputs and the distillation recipes."""
