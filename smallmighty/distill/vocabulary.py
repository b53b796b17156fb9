"""Whether a teacher and a student speak the same vocabulary, which token-level distillation needs.

Token-level KD compares the two models' next-token distributions id by id, so id i must be the same
token in both. Models of one family often differ only in padding rows (an embedding rounded up to a
multiple of 64 or 128 past the tokenizer's last id): that is the same vocabulary, and the shared
ids are the tokenizer's. Anything else (another tokenizer, another merge table, other special
tokens) is refused with a message that names both tokenizers and points to sequence-level KD,
which trains the student on the teacher's generated text and so works across tokenizers.
"""

from __future__ import annotations

import json

from smallmighty.errors import SlmError

#: How to ask for the method that works across tokenizers (used in messages).
SEQUENCE_KD_HINT = ("use sequence-level KD instead (`slm distill --method sequence`), which trains the student "
                    "on the teacher's generated text and works with any pair of tokenizers")


def _describe(tokenizer, name: str) -> str:
    return f"'{name}' ({type(tokenizer).__name__}, {len(tokenizer):,} tokens)"


def _splitting_rules(tokenizer) -> list:
    """What decides how text becomes ids: the model (vocabulary, merges), normaliser and pre-tokeniser."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    return [spec.get(key) for key in ("model", "normalizer", "pre_tokenizer")]


def shared_vocabulary(teacher_tokenizer, student_tokenizer, *, teacher_name: str, student_name: str) -> int:
    """The number of ids both models share (the tokenizer's size), or `SlmError` when they differ."""
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if teacher_vocab == student_vocab and _splitting_rules(teacher_tokenizer) == _splitting_rules(student_tokenizer):
        return len(teacher_vocab)
    only_teacher = len(teacher_vocab.keys() - student_vocab.keys())
    only_student = len(student_vocab.keys() - teacher_vocab.keys())
    moved = sum(1 for token, i in student_vocab.items() if teacher_vocab.get(token, i) != i)
    if only_teacher or only_student or moved:
        detail = f"{only_teacher:,} tokens only in the teacher's, {only_student:,} only in the student's"
        detail += f", {moved:,} shared tokens at other ids" if moved else ""
    else:
        detail = "the same tokens, split from text by different rules"
    raise SlmError(f"token-level distillation needs one vocabulary, but the teacher's tokenizer "
                   f"{_describe(teacher_tokenizer, teacher_name)} and the student's "
                   f"{_describe(student_tokenizer, student_name)} differ ({detail}); {SEQUENCE_KD_HINT}")
