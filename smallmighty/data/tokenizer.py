"""Train a byte-level BPE tokenizer on a corpus (`slm tokenizer train`) and save it as a standard HF folder.

Byte-level BPE (GPT-2, SmolLM2, Llama 3) never meets an unknown character: any byte sequence has a
tokenisation, so a model trained on one corpus still reads every text. The folder holds
`tokenizer.json` and `tokenizer_config.json`, which `AutoTokenizer.from_pretrained` loads anywhere.

The special tokens default to SmolLM2's, at the same ids: `<|endoftext|>` (0, end of document: the
EOS that separates packed documents, also used for padding), `<|im_start|>` and `<|im_end|>` (1, 2)
reserved for chat fine-tuning's ChatML turns.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from smallmighty.data.corpus import read_documents
from smallmighty.errors import DataError, SlmError
from smallmighty.io import atomic_path, read_json

DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _texts(sources: Sequence[str | Path], text_field: str) -> Iterator[str]:
    for source in sources:
        for doc in read_documents(source, text_field=text_field):
            yield doc.text


def train_tokenizer(sources: str | Path | Sequence[str | Path], out_dir: str | Path, *, vocab_size: int = 8192,
                    text_field: str = "text", min_frequency: int = 2,
                    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS, model_max_length: int = 2048) -> Path:
    """Train a byte-level BPE of `vocab_size` entries on the documents of `sources`; save it in `out_dir`.

    The first special token is the end-of-document token (`eos_token`, also `pad_token`).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if isinstance(sources, (str, Path)):
        sources = [sources]
    special_tokens = list(dict.fromkeys(special_tokens))
    if not special_tokens:
        raise SlmError("a tokenizer needs at least one special token (the end-of-document token)")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise SlmError(f"vocab_size must be at least {len(alphabet) + len(special_tokens)} (the 256 byte "
                       f"symbols and {len(special_tokens)} special tokens), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
                                  initial_alphabet=alphabet, show_progress=False)
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for text in _texts(sources, text_field):
            seen += 1
            yield text

    tokenizer.train_from_iterator(counted(), trainer)
    if not seen:
        raise DataError("empty corpus: no text to train a tokenizer on", file=", ".join(map(str, sources)))
    eos = special_tokens[0]
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=eos, eos_token=eos, pad_token=eos,
                                   unk_token=None, model_max_length=model_max_length,
                                   additional_special_tokens=special_tokens[1:] or None)
    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_tokenizer(fast, tmp)
    return out_dir


def save_tokenizer(tokenizer, directory: Path) -> None:
    """`tokenizer.save_pretrained(directory)`, with the tokenizer class every transformers version knows.

    transformers 5 writes its own backend's class name (`TokenizersBackend`), which older versions
    and other readers do not know; a fast tokenizer's files are the same under the classic name.
    """
    tokenizer.save_pretrained(str(directory))
    config_file = Path(directory) / "tokenizer_config.json"
    config = read_json(config_file)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
