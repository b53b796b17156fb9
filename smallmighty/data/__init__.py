"""Loading task data: labelled text for classification (files, folders, Hugging Face datasets)."""
