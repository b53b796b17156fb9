"""Models: encoder teachers and the students built from them (shape, vocabulary trim, structured
pruning, layer maps), a hand-written BERT/MPNet forward for export, and locating causal LMs
(GGUF files, Hugging Face folders, hub ids) as Hugging Face folders."""
