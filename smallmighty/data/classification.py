"""Labelled text for classification, from whatever layout the user already has.

`slm finetune`, `slm distill` and `slm eval` all take their data through `load_labelled_splits`, so
every command reads a dataset the same way, numbers its labels the same way, and reports a mistake
in the data the same way: by file, line and field, as a `DataError` rather than a traceback.

Layouts, tried in this order:

1. a single `.jsonl`/`.csv`/`.tsv` file, split into train and test by a seeded, stratified draw;
2. a `datasets.save_to_disk` folder (a DatasetDict with splits, or one Dataset that is split as in 1);
3. a folder of split files, `<split>.jsonl|.csv|.tsv` (or one file whose name starts with the split);
4. a folder of label folders, each holding one `.txt` file per example, split as in 1;
5. a Hugging Face Hub dataset name, handed to `datasets.load_dataset`.

A `labels.json` (a JSON list of names) beside the data fixes the label order; otherwise the names
are the sorted distinct training labels, so the same data always gives the same label indices.

Every choice a command makes (how long to train, which checkpoint to keep, the baseline's
regularisation) is made on a validation split, never on test: `load_labelled_data` returns train,
validation and test, the validation split being the data's own (`validation.jsonl`, `dev`, ...) when it
has one, else a stratified, seeded share of the training data.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smallmighty.errors import DataError, SlmError

log = logging.getLogger(__name__)

#: Table files we read, with the CSV delimiter of each (None: one JSON object per line).
_TABLE_DELIMITERS: dict[str, str | None] = {".jsonl": None, ".csv": ",", ".tsv": "\t"}
_LABELS_FILE = "labels.json"
# "name" or "owner/name", as the Hub spells them; anything else that does not exist is a bad path.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILE_SUFFIXES = {".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet"}
_INTEGER = re.compile(r"-?\d+")
_MISSING = object()
#: Split names taken as the data's own validation split when none is named, in this order.
VALIDATION_SPLIT_NAMES = ("validation", "valid", "dev", "val")
#: A validation split carved from training data holds at most this many examples: enough to tell
#: settings apart (one example is 0.05 points), while the rest stays for training.
MAX_CARVED_VALIDATION = 2000


@dataclass
class LabelledTexts:
    """Texts with integer labels; `label_names[labels[i]]` names the class of `texts[i]`."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.texts)


def source_key(source: str) -> str:
    """A data source as a model's metadata records it: an existing file or folder by its absolute path,
    so that a later run from another directory, or one naming it relative where this one named it
    absolute, still recognises it; anything else (a hub name) as it is."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


@dataclass
class LabelledSplits:
    """One task's train, validation and test splits, sharing `label_names`.

    `validation_origin` says where the validation split came from, for reports that record which
    split chose what.
    """

    train: LabelledTexts
    validation: LabelledTexts
    test: LabelledTexts
    validation_origin: str


@dataclass
class _Rows:
    """Examples as read, labels still as names, each with the line it came from for error messages."""

    file: str
    label_field: str | None
    texts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    lines: list[int | None] = field(default_factory=list)

    def add(self, text: Any, label: Any, line: int | None, text_field: str | None,
            available: str = "") -> None:
        """Check one example and keep it; `_MISSING` marks an absent field, `available` lists present ones."""
        if text is _MISSING:
            raise DataError(f"missing text field{available}", file=self.file, line=line, field=text_field)
        if label is _MISSING:
            raise DataError(f"missing label field{available}", file=self.file, line=line,
                            field=self.label_field)
        if not isinstance(text, str):
            raise DataError(f"text must be a string, got {_describe(text)}", file=self.file, line=line,
                            field=text_field)
        if not text.strip():
            raise DataError("empty text" if not text else "whitespace-only text", file=self.file,
                            line=line, field=text_field)
        self.texts.append(text)
        self.labels.append(self._label_name(label, line))
        self.lines.append(line)

    def _label_name(self, label: Any, line: int | None) -> str:
        # Names are strings so that 1 in one file and "1" in another are the same class.
        if label is None:
            raise DataError("label is null", file=self.file, line=line, field=self.label_field)
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(f"label must be a string or an integer, got {_describe(label)}",
                            file=self.file, line=line, field=self.label_field)
        if isinstance(label, str) and not label.strip():
            raise DataError("empty label", file=self.file, line=line, field=self.label_field)
        return str(label)

    def subset(self, indices: Iterable[int]) -> _Rows:
        """The rows at `indices`, in that order."""
        picked = _Rows(self.file, self.label_field)
        for i in indices:
            picked.texts.append(self.texts[i])
            picked.labels.append(self.labels[i])
            picked.lines.append(self.lines[i])
        return picked


@dataclass
class _FixedNames:
    """A label order given with the data (labels.json or a ClassLabel), and where it came from."""

    names: list[str]
    origin: str


def load_labelled_splits(
    source: str | Path, *, train_split: str = "train", test_split: str = "test",
    text_field: str = "text", label_field: str = "label", test_fraction: float = 0.2, seed: int = 0,
    max_train: int | None = None, max_test: int | None = None,
) -> tuple[LabelledTexts, LabelledTexts]:
    """Load (train, test) labelled texts from a file, folder, saved dataset or Hub dataset name.

    `train_split`/`test_split` pick split files or dataset splits; `test_fraction` and `seed` drive the
    stratified split of data that comes as one piece; `max_train`/`max_test` keep a seeded subsample
    that covers as many labels as the limit allows, for quick runs. Both splits share `label_names`.
    """
    if not 0 < test_fraction < 1:
        raise SlmError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    for name, limit in (("max_train", max_train), ("max_test", max_test)):
        if limit is not None and limit < 1:
            raise SlmError(f"{name} must be at least 1, got {limit}")
    loader = _Loader(train_split, test_split, text_field, label_field, test_fraction, random.Random(seed))
    path = Path(source).expanduser()
    if path.is_file():
        train, test = loader.single_file(path)
    elif path.is_dir():
        train, test = loader.directory(path)
    elif isinstance(source, str) and _looks_like_hub_name(source):
        train, test = loader.hub(source)
    else:
        raise SlmError(f"no such file or folder: {source}")
    return _subsample(train, max_train, loader.rng), _subsample(test, max_test, loader.rng)


def load_labelled_data(
    source: str | Path, *, validation_split: str | None = None, validation_fraction: float = 0.1,
    train_split: str = "train", test_split: str = "test", text_field: str = "text", label_field: str = "label",
    test_fraction: float = 0.2, seed: int = 0, max_train: int | None = None, max_test: int | None = None,
) -> LabelledSplits:
    """Load train, validation and test splits (see `load_labelled_splits` for the other options).

    The validation split is `validation_split` when given, else the data's own split named one of
    `VALIDATION_SPLIT_NAMES` if it has one (subsampled like test by `max_test`); otherwise a stratified,
    seeded `validation_fraction` of the training examples (at most `MAX_CARVED_VALIDATION`), carved
    after `max_train` has been applied, so the three splits never share an example.
    """
    if not 0 < validation_fraction < 1:
        raise SlmError(f"validation_fraction must be between 0 and 1 (exclusive), got {validation_fraction}")
    options = dict(train_split=train_split, text_field=text_field, label_field=label_field,
                   test_fraction=test_fraction, seed=seed, max_train=max_train, max_test=max_test)
    train, test = load_labelled_splits(source, test_split=test_split, **options)
    named = validation_split or _own_validation_split(source, exclude=(train_split, test_split))
    if named:
        _, validation = load_labelled_splits(source, test_split=named, **options)
        return LabelledSplits(train, validation, test, f"the data's own split '{named}' ({validation.source})")
    fraction = min(validation_fraction, MAX_CARVED_VALIDATION / len(train))
    train, validation = split_off_validation(train, fraction, seed)
    return LabelledSplits(train, validation, test,
                          f"{len(validation)} of the {len(train) + len(validation)} training examples "
                          f"(stratified, seed {seed})")


def split_off_validation(data: LabelledTexts, fraction: float, seed: int) -> tuple[LabelledTexts, LabelledTexts]:
    """(rest, validation): a stratified, seeded `fraction` of `data` held out, both in the original order."""
    names = [data.label_names[i] for i in data.labels]
    keep, held_out = _stratified_split(names, fraction, random.Random(f"validation-{seed}"))
    if not held_out:
        raise SlmError(f"{data.source}: too few examples ({len(data)}) to hold out a validation split; add data "
                       "or name a validation split")

    def pick(indices: list[int], source: str) -> LabelledTexts:
        return LabelledTexts([data.texts[i] for i in indices], [data.labels[i] for i in indices],
                             list(data.label_names), source)

    return pick(keep, data.source), pick(held_out, f"{data.source} [validation share]")


def _own_validation_split(source: str | Path, exclude: tuple[str, ...]) -> str | None:
    """The name of the data's own validation split, if it is a folder of split files or a saved
    DatasetDict with one (for a Hub dataset, name it with `validation_split`)."""
    path = Path(source).expanduser()
    names: set[str] = set()
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        names = set(_saved_split_names(path / "dataset_dict.json"))
    elif path.is_dir():
        names = {p.stem for p in path.iterdir() if p.is_file() and p.suffix.lower() in _TABLE_DELIMITERS}
    return next((name for name in VALIDATION_SPLIT_NAMES if name in names and name not in exclude), None)


def _saved_split_names(path: Path) -> list[str]:
    """The split names listed in a `datasets` dataset_dict.json."""
    try:
        splits = json.loads(path.read_text()).get("splits", [])
    except (OSError, json.JSONDecodeError, AttributeError):
        return []
    return [name for name in splits if isinstance(name, str)]


@dataclass
class _Loader:
    """The options of one `load_labelled_splits` call, shared by the layout readers."""

    train_split: str
    test_split: str
    text_field: str
    label_field: str
    test_fraction: float
    rng: random.Random

    def single_file(self, path: Path) -> tuple[LabelledTexts, LabelledTexts]:
        """One table file: a stratified split, with labels.json beside it if there is one."""
        if path.suffix.lower() not in _TABLE_DELIMITERS:
            raise SlmError(f"{path}: unsupported file type '{path.suffix}'; use .jsonl, .csv or .tsv, "
                           "or a folder of them")
        rows = self._read_table(path)
        return self._split_and_assemble(rows, _read_labels_file(path.parent), str(path))

    def directory(self, path: Path) -> tuple[LabelledTexts, LabelledTexts]:
        """A saved dataset, a folder of split files, or a folder of label folders."""
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return self.saved_dataset(path)
        tables = [p for p in sorted(path.iterdir()) if p.is_file() and p.suffix.lower() in _TABLE_DELIMITERS]
        if tables:
            by_split = _group_by_stem(tables)
            train_file = by_split[_pick_split(by_split, self.train_split, str(path))]
            test_file = by_split[_pick_split(by_split, self.test_split, str(path))]
            fixed = _read_labels_file(path)
            return _assemble(self._read_table(train_file), self._read_table(test_file), fixed,
                             str(train_file), str(test_file))
        folders = [p for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith((".", "_"))]
        if folders:
            rows = _read_label_folders(folders)
            return self._split_and_assemble(rows, _read_labels_file(path), str(path))
        raise SlmError(f"{path}: found no split files (.jsonl/.csv/.tsv), no label folders of .txt files "
                       "and no saved dataset")

    def saved_dataset(self, path: Path) -> tuple[LabelledTexts, LabelledTexts]:
        """A folder written by `datasets`' save_to_disk."""
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except (OSError, ValueError, datasets.exceptions.DatasetsError) as error:
            raise SlmError(f"{path}: could not load the saved dataset: {error}") from error
        return self._from_datasets(loaded, str(path))

    def hub(self, name: str) -> tuple[LabelledTexts, LabelledTexts]:
        """A Hugging Face Hub dataset, which needs a network connection or the local datasets cache."""
        import datasets

        try:
            loaded = datasets.load_dataset(name)
        except (OSError, ValueError, datasets.exceptions.DatasetsError) as error:
            raise SlmError(
                f"'{name}' is not a local file or folder, and it could not be downloaded from the "
                f"Hugging Face Hub ({error}). Pass a local path instead: a .jsonl/.csv/.tsv file, a folder "
                "of split files or of label folders, or a save_to_disk folder") from error
        return self._from_datasets(loaded, name)

    def _from_datasets(self, loaded: Any, source: str) -> tuple[LabelledTexts, LabelledTexts]:
        import datasets

        if isinstance(loaded, datasets.DatasetDict):
            train_name = _pick_split(loaded, self.train_split, source)
            test_name = _pick_split(loaded, self.test_split, source)
            train_where, test_where = f"{source} [split {train_name}]", f"{source} [split {test_name}]"
            train, fixed = self._dataset_rows(loaded[train_name], train_where)
            test, _ = self._dataset_rows(loaded[test_name], test_where)
            return _assemble(train, test, fixed, train_where, test_where)
        rows, fixed = self._dataset_rows(loaded, source)
        return self._split_and_assemble(rows, fixed, source)

    def _dataset_rows(self, dataset: Any, where: str) -> tuple[_Rows, _FixedNames | None]:
        """A `datasets.Dataset` as rows; "line" N in messages is its row N (1-based)."""
        import datasets

        columns = dataset.column_names
        for wanted in (self.text_field, self.label_field):
            if wanted not in columns:
                raise DataError(f"no such column; the columns are {', '.join(columns)}", file=where,
                                field=wanted)
        feature = dataset.features[self.label_field]
        names = feature.names if isinstance(feature, datasets.ClassLabel) else None
        rows = _Rows(where, self.label_field)
        for number, (text, label) in enumerate(zip(dataset[self.text_field], dataset[self.label_field]), 1):
            if names is not None:
                if not isinstance(label, int) or not 0 <= label < len(names):
                    raise DataError(f"label {label} is not a class index 0..{len(names) - 1} (-1 marks an "
                                    "unlabelled row)", file=where, line=number, field=self.label_field)
                label = names[label]
            rows.add(text, label, number, self.text_field)
        return rows, (_FixedNames(list(names), f"the ClassLabel names of {where}") if names else None)

    def _read_table(self, path: Path) -> _Rows:
        delimiter = _TABLE_DELIMITERS[path.suffix.lower()]
        content = _decode_utf8(_read_bytes(path), str(path))
        if delimiter is None:
            rows = _read_jsonl(content, str(path), self.text_field, self.label_field)
        else:
            rows = _read_delimited(content, str(path), delimiter, self.text_field, self.label_field)
        if not rows.texts:
            raise DataError("empty file: no examples", file=str(path))
        return rows

    def _split_and_assemble(self, rows: _Rows, fixed: _FixedNames | None,
                            source: str) -> tuple[LabelledTexts, LabelledTexts]:
        train_indices, test_indices = _stratified_split(rows.labels, self.test_fraction, self.rng)
        if not test_indices:
            raise SlmError(f"{source}: too few examples ({len(rows.texts)}) to hold out a test fraction of "
                           f"{self.test_fraction}; add data or raise the test fraction")
        return _assemble(rows.subset(train_indices), rows.subset(test_indices), fixed, source, source)


def _read_jsonl(content: str, file: str, text_field: str, label_field: str) -> _Rows:
    rows = _Rows(file, label_field)
    # Split on "\n" only: str.splitlines would also break at U+2028, which JSON strings may hold raw.
    for number, line in enumerate(content.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"invalid JSON: {error.msg} (column {error.colno})", file=file,
                            line=number) from None
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object, got {_describe(record)}", file=file, line=number)
        available = f"; this line has keys {', '.join(map(str, record)) or '(none)'}"
        rows.add(record.get(text_field, _MISSING), record.get(label_field, _MISSING), number, text_field,
                 available)
    return rows


def _read_delimited(content: str, file: str, delimiter: str, text_field: str, label_field: str) -> _Rows:
    # TSV has no quoting convention (GLUE files hold bare quote characters), so quotes are kept as text.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(content, newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    rows = _Rows(file, label_field)
    try:
        header = next((row for row in reader if any(cell.strip() for cell in row)), None)
        if header is None:
            raise DataError("empty file: no header and no examples", file=file)
        for wanted in (text_field, label_field):
            if wanted not in header:
                raise DataError(f"no such column; the header has {', '.join(header)}", file=file,
                                line=reader.line_num, field=wanted)
        text_at, label_at = header.index(text_field), header.index(label_field)
        last_line = reader.line_num
        for record in reader:
            # A quoted field may span lines; report the line the record starts on.
            number, last_line = last_line + 1, reader.line_num
            if not any(cell.strip() for cell in record):
                continue
            if len(record) != len(header):
                raise DataError(f"{len(record)} fields, but the header has {len(header)} (an unquoted "
                                "delimiter inside the text?)", file=file, line=number)
            rows.add(record[text_at], record[label_at], number, text_field)
    except csv.Error as error:
        kind = "TSV" if delimiter == "\t" else "CSV"
        raise DataError(f"malformed {kind}: {error}", file=file, line=reader.line_num) from None
    return rows


def _read_label_folders(folders: Sequence[Path]) -> _Rows:
    """One example per .txt file, labelled by its folder's name, each file's text stripped."""
    rows = _Rows(str(folders[0].parent), None)
    for folder in folders:
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise DataError("label folder has no .txt files", file=str(folder))
        for path in files:
            text = _decode_text_file(_read_bytes(path), str(path)).strip()
            if not text:
                raise DataError("empty text", file=str(path))
            rows.texts.append(text)
            rows.labels.append(folder.name)
            rows.lines.append(None)
    return rows


def _read_labels_file(directory: Path) -> _FixedNames | None:
    """labels.json in `directory`, checked to be a list of distinct, non-empty strings."""
    path = directory / _LABELS_FILE
    if not path.is_file():
        return None
    file = str(path)
    try:
        names = json.loads(_decode_utf8(_read_bytes(path), file))
    except json.JSONDecodeError as error:
        raise DataError(f"invalid JSON: {error.msg} (column {error.colno})", file=file,
                        line=error.lineno) from None
    example = 'a JSON list of label names, e.g. ["negative", "positive"]'
    if not isinstance(names, list) or not names:
        raise DataError(f"expected {example}, got {_describe(names)}", file=file)
    seen: set[str] = set()
    for position, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"item {position} is {_describe(name)}; expected {example}", file=file)
        if name in seen:
            raise DataError(f"label '{name}' is listed twice", file=file)
        seen.add(name)
    return _FixedNames(names, file)


def _assemble(train: _Rows, test: _Rows, fixed: _FixedNames | None, train_source: str,
              test_source: str) -> tuple[LabelledTexts, LabelledTexts]:
    """Turn label names into indices: the fixed order if given, else the sorted training labels."""
    names = fixed.names if fixed else _sorted_names(set(train.labels))
    index = {name: i for i, name in enumerate(names)}

    def indices(rows: _Rows) -> list[int]:
        numbers = []
        for label, line in zip(rows.labels, rows.lines):
            number = index.get(label)
            if number is None:
                if fixed:
                    problem = f"label '{label}' is not in {fixed.origin}"
                else:
                    problem = (f"label '{label}' in the test split never appears in training "
                               f"(training labels: {', '.join(names)})")
                raise DataError(problem, file=rows.file, line=line, field=rows.label_field)
            numbers.append(number)
        return numbers

    return (LabelledTexts(train.texts, indices(train), names, train_source),
            LabelledTexts(test.texts, indices(test), list(names), test_source))


def _stratified_split(labels: Sequence[str], test_fraction: float,
                      rng: random.Random) -> tuple[list[int], list[int]]:
    """Per label (in sorted order), shuffle its rows and hold out round(fraction * count) of them.

    Every label keeps at least one training example, and both splits stay in file order. Labels too
    rare for their rounded share (many labels with a few examples each) would otherwise all give
    none, leaving the held-out split empty: a seeded draw of them gives one example each, as many
    as their combined share.
    """
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    held_out: set[int] = set()
    rare: list[list[int]] = []
    for label in _sorted_names(by_label):
        members = by_label[label]
        rng.shuffle(members)
        share = min(round(test_fraction * len(members)), len(members) - 1)
        held_out.update(members[:share])
        if share == 0 and len(members) > 1:
            rare.append(members)
    if rare:
        rng.shuffle(rare)
        for members in rare[:round(test_fraction * sum(len(m) for m in rare))]:
            held_out.add(members[0])
    train = [i for i in range(len(labels)) if i not in held_out]
    return train, sorted(held_out)


def _subsample(data: LabelledTexts, limit: int | None, rng: random.Random) -> LabelledTexts:
    """At most `limit` examples: first one per label (while the limit allows), then in label proportion."""
    if limit is None or limit >= len(data):
        return data
    by_label: dict[int, list[int]] = {}
    for i, label in enumerate(data.labels):
        by_label.setdefault(label, []).append(i)
    priority: dict[int, tuple[bool, float, float]] = {}
    for members in by_label.values():
        rng.shuffle(members)
        for rank, i in enumerate(members):
            # rank 0 first (coverage); then items spread evenly over each label's share; random ties.
            priority[i] = (rank > 0, (rank + 0.5) / len(members), rng.random())
    kept = sorted(sorted(priority, key=priority.__getitem__)[:limit])
    return LabelledTexts([data.texts[i] for i in kept], [data.labels[i] for i in kept],
                         data.label_names, data.source)


def _group_by_stem(files: Iterable[Path]) -> dict[str, Path]:
    by_stem: dict[str, Path] = {}
    for path in files:
        if path.stem in by_stem:
            raise SlmError(f"two files for split '{path.stem}': {by_stem[path.stem].name} and {path.name}; "
                           "keep one")
        by_stem[path.stem] = path
    return by_stem


def _pick_split(splits: Iterable[str], wanted: str, where: str) -> str:
    """The split named `wanted`, else the one split whose name starts with it (test -> test_sst_binary)."""
    splits = sorted(splits)
    if wanted in splits:
        return wanted
    matches = [name for name in splits if name.startswith(wanted)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise SlmError(f"{where}: split '{wanted}' is ambiguous ({', '.join(matches)}); "
                       "pass the full split name")
    raise SlmError(f"{where}: no split '{wanted}'; available splits: {', '.join(splits)}")


def _sorted_names(labels: Iterable[str]) -> list[str]:
    """Integer labels in numeric order (so "10" follows "9"), anything else alphabetically."""
    labels = list(labels)
    if all(_INTEGER.fullmatch(label) for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _looks_like_hub_name(source: str) -> bool:
    return bool(_HUB_NAME.fullmatch(source)) and Path(source).suffix.lower() not in _FILE_SUFFIXES


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise SlmError(f"cannot read {path}: {error.strerror}") from None


def _decode_utf8(data: bytes, file: str) -> str:
    """UTF-8 text (a leading byte-order mark dropped); a bad byte is reported with its line."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"not valid UTF-8 (byte 0x{data[error.start]:02x}); save the file as UTF-8",
                        file=file, line=data.count(b"\n", 0, error.start) + 1) from None


def _decode_text_file(data: bytes, file: str) -> str:
    """UTF-8, falling back (with a warning) to Windows-1252 for one-file-per-example corpora.

    Such corpora predate UTF-8 everywhere: the default BBC News data has one article whose pound
    sign is the single Latin-1 byte 0xA3. Table files get no such fallback; they must be UTF-8.
    """
    try:
        return _decode_utf8(data, file)
    except DataError as utf8_error:
        try:
            text = data.decode("cp1252")
        except UnicodeDecodeError:
            raise utf8_error from None
        log.warning("%s, line %s: not valid UTF-8; read as Windows-1252", file, utf8_error.line)
        return text


def _describe(value: Any) -> str:
    """A wrongly-typed value, shortened, with its type, for an error message."""
    return f"{repr(value)[:40]} ({type(value).__name__})"
