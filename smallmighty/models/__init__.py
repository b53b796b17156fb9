"""Model loading and construction: teachers from Hugging Face, students built from a shape or a teacher."""
