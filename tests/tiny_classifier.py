"""A tiny random BERT classifier folder with MiniLM's tokenizer, shared by the export tests.

A plain module next to conftest.py (pytest puts this folder on sys.path), not a test file.
"""

from __future__ import annotations

from pathlib import Path

LABELS = ["billing", "delivery", "refund", "other"]
#: From one word to past the 40-token limit, so exports are checked on short, padded and truncated texts.
TEXTS = ["my card has not arrived yet", "refund please", "Where is my parcel? It was due on Monday and "
         "nobody has called me back, which is really annoying.", "hi", "can I pay by bank transfer instead "
         "of card", "the app keeps crashing when I open the statements page after the update"]
MAX_POSITIONS = 40


def write_tiny_classifier(directory: Path) -> Path:
    """2 layers, width 48, 40 positions. initializer_range 0.2 gives logits of order 1, so a wrong
    export shows up as a large difference rather than hiding under tiny logits."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from smallmighty.defaults import default_teacher_encoder

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(default_teacher_encoder())
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=MAX_POSITIONS, initializer_range=0.2,
                        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    BertForSequenceClassification(config).eval().save_pretrained(directory)
    tokenizer.model_max_length = MAX_POSITIONS
    tokenizer.save_pretrained(directory)
    return directory
