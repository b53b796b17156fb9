"""Training loops: fine-tuning on a task, with Accelerate so one command scales to many processes."""
