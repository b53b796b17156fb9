"""Trim a byte-level BPE tokenizer (GPT-2, SmolLM2, Llama 3, Qwen) to the tokens a corpus uses.

Why: a small decoder spends most of its parameters on the vocabulary. SmolLM2's 49,152 x 576
embedding is 28M of its 135M weights, while Tiny Shakespeare uses about 11k of those tokens. A
student that keeps only the used rows is that much smaller and faster to train, and its output
softmax is that much cheaper.

What is kept: every special (added) token, the 256 byte symbols (so any text still has a
tokenisation), every token the corpus uses, and the tokens those are merged from (the "merge
closure"). Merges whose result is not kept are dropped. On the corpus the trimmed tokenizer then
produces exactly the teacher's tokens, renumbered: BPE applies the lowest-ranked applicable merge
at each step, and every merge the teacher applied to a corpus word is still there, while a dropped
merge was never applicable there (it would have made a token the corpus does not use). A word
outside the corpus may split into more, smaller pieces, but its text is unchanged.

Ids keep the teacher's order (`teacher_ids[i]` is the teacher id of student id i), so specials at
the front keep their ids, and `to_teacher_ids` maps any student output back to the teacher's ids:
decoding either gives the same text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from smallmighty.errors import SlmError


@dataclass
class TrimmedVocab:
    """A trimmed tokenizer and, for each of its ids, the teacher id it stands for."""

    tokenizer: object  # transformers PreTrainedTokenizerFast
    teacher_ids: list[int]

    def to_teacher_ids(self, ids: Iterable[int]) -> list[int]:
        return [self.teacher_ids[i] for i in ids]

    def from_teacher_ids(self, ids: Iterable[int]) -> list[int]:
        """Student ids for teacher ids that are all kept (ids of the training corpus are)."""
        index = {t: s for s, t in enumerate(self.teacher_ids)}
        try:
            return [index[i] for i in ids]
        except KeyError as exc:
            raise SlmError(f"teacher token {exc.args[0]} is not in the trimmed vocabulary") from None


def _byte_level(spec: dict) -> bool:
    """Whether a tokenizer.json pre-tokenizer is (or contains) the byte-level one."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(p.get("type") == "ByteLevel" for p in parts)


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    """Merges as (left, right) pairs; tokenizers writes them as lists, older files as "left right"."""
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def _closure(keep: set[str], produced_by: dict[str, list[tuple[str, str]]]) -> set[str]:
    """`keep` plus every token its members are merged from, recursively."""
    closed, todo = set(keep), list(keep)
    while todo:
        for left, right in produced_by.get(todo.pop(), ()):
            for part in (left, right):
                if part not in closed:
                    closed.add(part)
                    todo.append(part)
    return closed


def trim_bpe_tokenizer(tokenizer, used_ids: Iterable[int]) -> TrimmedVocab:
    """A copy of `tokenizer` (a transformers fast tokenizer) keeping `used_ids` and what they need.

    Raises `SlmError` for tokenizers this cannot trim without changing how text is split (anything
    but byte-level BPE, such as WordPiece, Unigram or byte-fallback BPE).
    """
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback") or not _byte_level(spec):
        raise SlmError(f"vocabulary trimming supports byte-level BPE tokenizers; "
                       f"'{getattr(tokenizer, 'name_or_path', 'this tokenizer')}' is "
                       f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}"
                       "; keep the whole vocabulary (--no-trim-vocab)")
    vocab: dict[str, int] = model["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a["content"] for a in spec.get("added_tokens", [])}
    unknown = sorted({i for i in used_ids if i not in by_id and i not in added})
    if unknown:
        raise SlmError(f"token ids {unknown[:5]} are not in the tokenizer's vocabulary")
    keep = {by_id[i] for i in set(used_ids) | set(added) if i in by_id}
    keep |= {t for t in pre_tokenizers.ByteLevel.alphabet() if t in vocab}
    pairs = _merge_pairs(model["merges"])
    produced_by: dict[str, list[tuple[str, str]]] = {}
    for left, right in pairs:
        produced_by.setdefault(left + right, []).append((left, right))
    keep = _closure(keep, produced_by)
    teacher_ids = sorted({vocab[t] for t in keep} | set(added))
    new_id = {old: new for new, old in enumerate(teacher_ids)}
    model["vocab"] = {t: new_id[i] for t, i in vocab.items() if t in keep}
    model["merges"] = [[left, right] for left, right in pairs if left + right in keep]  # parts are kept too
    for token in spec.get("added_tokens", []):
        token["id"] = new_id[token["id"]]
    _renumber_post_processor(spec.get("post_processor"), new_id)
    backend = Tokenizer.from_str(json.dumps(spec))
    special = {name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
               if getattr(tokenizer, name, None) is not None}
    extra = [t for t in getattr(tokenizer, "additional_special_tokens", None) or [] if t not in special.values()]
    trimmed = PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=tokenizer.model_max_length,
                                      additional_special_tokens=extra or None, **special)
    trimmed.chat_template = getattr(tokenizer, "chat_template", None)
    if len(trimmed) != len(teacher_ids):
        raise SlmError(f"the trimmed tokenizer has {len(trimmed)} tokens where {len(teacher_ids)} were kept")
    return TrimmedVocab(trimmed, teacher_ids)


def _renumber_post_processor(processor: dict | None, new_id: dict[int, int]) -> None:
    """Special-token ids inside a post-processor (BOS added by a template) follow the renumbering."""
    if not processor:
        return
    for inner in processor.get("processors", []):
        _renumber_post_processor(inner, new_id)
    for special in (processor.get("special_tokens") or {}).values():
        special["ids"] = [new_id[i] for i in special.get("ids", [])]
    for key in ("sep", "cls"):
        if isinstance(processor.get(key), list) and len(processor[key]) == 2:
            processor[key][1] = new_id[processor[key][1]]
