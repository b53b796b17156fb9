"""Text corpora for causal language models: read, tokenised once, packed into training sequences.

A corpus is any of:

1. a plain text file (`.txt`, or any file that is not `.jsonl`): one document;
2. a JSONL file: one document per line, the text under `text_field`;
3. a folder of such files (searched recursively, in sorted order), or a `datasets.save_to_disk` folder;
4. a Hugging Face dataset name, handed to `datasets.load_dataset` (a network connection or the
   local datasets cache).

Documents are tokenised once and the ids cached under `cache_dir("tokens")`, keyed by the corpus's
bytes (`content_fingerprint`) and the tokenizer, so a second run (another model size, another
sequence length, every rank of a multi-process run) starts from the cached ids. Packing is cheap and
happens at load time: the documents, each followed by the EOS token, form one stream that is cut
into rows of `seq_len` tokens (the ragged end is dropped), GPT-style, so no compute goes to padding.
The validation split is the tail of that stream (`val_fraction`), or a separate corpus.

Bad input stops with one line naming the file and line: an empty corpus, bytes that are not UTF-8,
a JSONL line without the text field, or a corpus too small for one sequence.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from smallmighty.cache import cache_dir, content_fingerprint
from smallmighty.errors import DataError, SlmError
from smallmighty.io import atomic_path

if TYPE_CHECKING:
    import torch

#: Bump when the cached ids would differ for the same inputs (reading, EOS placement).
_SCHEME = "corpus-v1"
#: A long text is tokenised in pieces of about this many characters, cut where a line starts with a
#: non-space character: byte-level pre-tokenisers never merge across such a point, so the ids equal
#: those of the whole text.
_PIECE_CHARS = 1 << 20
_PIECE_CUT = re.compile(r"\n(?=\S)")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclass
class Document:
    """One document's text and where it came from (`line` is None for a whole file)."""

    text: str
    file: str
    line: int | None = None


@dataclass
class PackedCorpus:
    """Training and validation sequences, each row `seq_len` token ids (int64)."""

    train: "torch.Tensor"  # [rows, seq_len]
    validation: "torch.Tensor"
    seq_len: int
    eos_token_id: int
    source: str

    @property
    def train_tokens(self) -> int:
        return self.train.numel()

    def examples(self) -> list[dict]:
        """The training rows as the training loop's examples (`{"input_ids": row}`)."""
        return [{"input_ids": row} for row in self.train]


def corpus_files(path: Path) -> list[Path]:
    """The files of a corpus given as a file or a folder (hidden files and folders skipped)."""
    if path.is_file():
        return [path]
    files = [p for p in sorted(path.rglob("*")) if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    if not files:
        raise DataError("empty corpus: the folder holds no files", file=str(path))
    return files


def read_documents(source: str | Path, *, text_field: str = "text", split: str = "train") -> Iterator[Document]:
    """Yield the documents of a corpus (see the module docstring for the layouts).

    Whitespace-only documents are skipped; a corpus with none left is an error.
    """
    path = Path(source).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        yield from _dataset_documents(_load_saved_dataset(path), str(path), text_field, split)
        return
    if path.exists():
        for file in corpus_files(path):
            yield from _file_documents(file, text_field)
        return
    if isinstance(source, str) and _HUB_NAME.fullmatch(source):
        yield from _dataset_documents(_load_hub_dataset(source), source, text_field, split)
        return
    raise SlmError(f"no such file or folder: {source}")


def _decode(file: Path) -> str:
    data = file.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"not UTF-8 text (byte 0x{data[err.start]:02x} at byte offset {err.start})",
                        file=str(file), line=line) from None


def _file_documents(file: Path, text_field: str) -> Iterator[Document]:
    text = _decode(file)
    if file.suffix.lower() != ".jsonl":
        if text.strip():
            yield Document(text, str(file))
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"not valid JSON ({err.msg})", file=str(file), line=number) from None
        if not isinstance(row, dict) or text_field not in row:
            present = f" (keys: {', '.join(sorted(row))})" if isinstance(row, dict) else ""
            raise DataError(f"missing text field{present}; choose another with --text-field",
                            file=str(file), line=number, field=text_field)
        value = row[text_field]
        if not isinstance(value, str):
            raise DataError(f"text must be a string, got {type(value).__name__}", file=str(file), line=number,
                            field=text_field)
        if value.strip():
            yield Document(value, str(file), number)


def _load_saved_dataset(path: Path):
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:
        raise SlmError(f"{path}: could not load the saved dataset: {err}") from err


def _load_hub_dataset(name: str):
    import datasets

    try:
        return datasets.load_dataset(name)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:
        raise SlmError(f"'{name}' is not a local file or folder, and loading it as a Hugging Face dataset "
                       f"failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from err


def _dataset_documents(loaded, name: str, text_field: str, split: str) -> Iterator[Document]:
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise SlmError(f"{name}: no split '{split}' (splits: {', '.join(loaded)})")
        loaded, name = loaded[split], f"{name}[{split}]"
    if text_field not in loaded.column_names:
        raise DataError(f"missing text field (columns: {', '.join(loaded.column_names)}); choose another "
                        "with --text-field", file=name, field=text_field)
    for row, value in enumerate(loaded[text_field], 1):
        if not isinstance(value, str):
            raise DataError(f"text must be a string, got {type(value).__name__}", file=name, line=row,
                            field=text_field)
        if value.strip():
            yield Document(value, name, row)


def _pieces(text: str) -> list[str]:
    """`text` cut into pieces of about `_PIECE_CHARS` whose ids, concatenated, are the text's ids."""
    pieces, start = [], 0
    while len(text) - start > _PIECE_CHARS:
        cut = _PIECE_CUT.search(text, start + _PIECE_CHARS)
        if cut is None:
            break
        pieces.append(text[start:cut.end()])
        start = cut.end()
    pieces.append(text[start:])
    return pieces


def tokenizer_fingerprint(tokenizer) -> str:
    """A key for what a tokenizer does to text: its full definition and its EOS id."""
    backend = tokenizer.backend_tokenizer.to_str()
    return hashlib.sha256(f"{backend}\0{tokenizer.eos_token_id}".encode()).hexdigest()[:16]


def source_fingerprint(source: str | Path, text_field: str, split: str) -> str:
    path = Path(source).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        files = [p for p in path.rglob("*") if p.is_file()]
    elif path.exists():
        files = corpus_files(path)
    else:  # a hub dataset: the datasets library fingerprints its own cache
        return hashlib.sha256(f"hub:{source}".encode()).hexdigest()[:16]
    return content_fingerprint(files)


def tokenize_corpus(source: str | Path, tokenizer, *, text_field: str = "text", split: str = "train",
                    progress: bool = True) -> np.ndarray:
    """The token ids of every document of `source`, each followed by EOS, as one int32 array.

    Cached under `cache_dir("tokens")` by corpus content and tokenizer (hub datasets are read again
    each time, as only `datasets` knows whether they changed).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise SlmError(f"the tokenizer '{getattr(tokenizer, 'name_or_path', '')}' has no EOS token, "
                       "which separates packed documents; set eos_token in its tokenizer_config.json")
    is_hub = not Path(source).expanduser().exists()
    key = hashlib.sha256(f"{_SCHEME}\0{source_fingerprint(source, text_field, split)}\0{text_field}\0{split}\0"
                         f"{tokenizer_fingerprint(tokenizer)}".encode()).hexdigest()[:20]
    cached = cache_dir("tokens") / f"{key}.npy"
    if cached.is_file() and not is_hub:
        return np.load(cached, allow_pickle=False)
    ids = _tokenize(read_documents(source, text_field=text_field, split=split), tokenizer, eos, progress)
    if ids.size == 0:
        raise DataError("empty corpus: no text in it", file=str(source))
    if not is_hub:
        with atomic_path(cached) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, ids, allow_pickle=False)
    return ids


def _tokenize(documents: Iterator[Document], tokenizer, eos: int, progress: bool) -> np.ndarray:
    from tqdm.auto import tqdm

    backend = tokenizer.backend_tokenizer
    parts: list[np.ndarray] = []
    batch: list[tuple[str, bool]] = []  # (piece, ends a document)
    batch_chars = 0

    def flush() -> None:
        encodings = backend.encode_batch([piece for piece, _ in batch], add_special_tokens=False)
        for (_, last), encoding in zip(batch, encodings):
            parts.append(np.asarray(encoding.ids + ([eos] if last else []), dtype=np.int32))
        batch.clear()

    bar = tqdm(desc="tokenise", unit="doc", disable=not progress, leave=False)
    for doc in documents:
        pieces = _pieces(doc.text)
        for i, piece in enumerate(pieces):
            batch.append((piece, i == len(pieces) - 1))
            batch_chars += len(piece)
        if batch_chars >= 8 * _PIECE_CHARS or len(batch) >= 4096:
            flush()
            batch_chars = 0
        bar.update(1)
    if batch:
        flush()
    bar.close()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def pack(ids: np.ndarray, seq_len: int) -> "torch.Tensor":
    """Rows of `seq_len` consecutive ids (int64); the ragged end of the stream is dropped."""
    import torch

    rows = len(ids) // seq_len
    return torch.from_numpy(ids[: rows * seq_len].astype(np.int64)).view(rows, seq_len)


def load_corpus(source: str | Path, tokenizer, seq_len: int, *, text_field: str = "text", split: str = "train",
                val_fraction: float = 0.1, val_source: str | Path | None = None,
                progress: bool = True) -> PackedCorpus:
    """Tokenise (or read from the cache) and pack a corpus into training and validation rows.

    Validation is the last `val_fraction` of the token stream, or all of `val_source` when given.
    """
    if seq_len < 2:
        raise SlmError(f"seq_len must be at least 2, got {seq_len}")
    ids = tokenize_corpus(source, tokenizer, text_field=text_field, split=split, progress=progress)
    if val_source is not None:
        train_ids = ids
        val_ids = tokenize_corpus(val_source, tokenizer, text_field=text_field, split=split, progress=progress)
        val_name = str(val_source)
    else:
        if not 0 < val_fraction < 1:
            raise SlmError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        cut = len(ids) - int(len(ids) * val_fraction)
        train_ids, val_ids = ids[:cut], ids[cut:]
        val_name = f"{source} (last {val_fraction:g} of its tokens)"
    for name, part, what in ((str(source), train_ids, "training"), (val_name, val_ids, "validation")):
        if len(part) < seq_len:
            raise DataError(f"corpus too small: {len(part)} {what} tokens, fewer than one sequence of {seq_len}; "
                            "give more text or a shorter sequence length", file=name)
    return PackedCorpus(pack(train_ids, seq_len), pack(val_ids, seq_len), seq_len, tokenizer.eos_token_id,
                        str(source))
