"""Encoder classifiers: load a Hugging Face teacher, build a small student, save both in standard format.

Students are standard transformers classifiers (the teacher's family when cut from a BERT or MPNet
teacher, else BERT) with a standard tokenizer, so `AutoModelForSequenceClassification.from_pretrained(out)`
loads them anywhere. A student is built
either from an explicit shape or by shrinking the teacher: keep every k-th layer, narrow the width by
keeping the teacher's most active channels, heads and FFN neurons, and trim the vocabulary to the
word pieces the training data uses.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from smallmighty.errors import SlmError
from smallmighty.io import atomic_path, read_json
from smallmighty.models.bert_encoder import position_offset
from smallmighty.models.prune import (
    Importance,
    activation_importance,
    can_prune,
    pruned_state_dict,
)

#: Written next to config.json: how the model was made and the sequence length it was trained at.
META_FILE = "smallmighty.json"


def _transformers():
    """Import transformers lazily: it is slow to import and not every command needs it."""
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _check_local_path(name_or_path: str) -> None:
    """A path that cannot be a hub id must exist: one clear error instead of the hub client's."""
    if not Path(name_or_path).exists() and (str(name_or_path).startswith((".", "/"))
                                            or str(name_or_path).count("/") > 1):
        raise SlmError(f"model path '{name_or_path}' does not exist")


def load_tokenizer(name_or_path: str):
    _check_local_path(name_or_path)
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise SlmError(f"could not load a tokenizer from '{name_or_path}': {exc}") from exc


def load_encoder_classifier(name_or_path: str, label_names: list[str] | None = None) -> tuple[nn.Module, object]:
    """Load an encoder with a classification head for `label_names`.

    When the checkpoint already has a head for exactly these labels it is kept (a fine-tuned
    teacher); otherwise a fresh head is made (a base encoder such as MiniLM, or a different task).
    """
    _check_local_path(name_or_path)
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(name_or_path), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise SlmError(f"could not load a model config from '{name_or_path}': {exc}") from exc
    kwargs: dict = {}
    if label_names is not None:
        existing = [config.id2label[i] for i in sorted(config.id2label)] if config.id2label else []
        if existing != list(label_names):
            kwargs = dict(
                num_labels=len(label_names),
                id2label=dict(enumerate(label_names)),
                label2id={n: i for i, n in enumerate(label_names)},
                ignore_mismatched_sizes=True,
            )
    try:
        # fp32 master weights whatever the checkpoint's dtype: training in fp16 on a CPU diverges.
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(name_or_path), trust_remote_code=False, dtype=torch.float32, **kwargs
        )
    except (OSError, ValueError) as exc:
        raise SlmError(f"could not load an encoder classifier from '{name_or_path}': {exc}") from exc
    return model, load_tokenizer(name_or_path)


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def label_names_of(model: nn.Module) -> list[str]:
    id2label = model.config.id2label
    return [id2label[i] for i in sorted(id2label)]


def save_classifier(model: nn.Module, tokenizer, out_dir: str | Path, *, max_length: int,
                    meta: dict | None = None) -> Path:
    """Save model (safetensors), tokenizer and our metadata, atomically replacing `out_dir`."""
    out_dir = Path(out_dir)
    tokenizer.model_max_length = max_length
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps({"max_length": max_length, **(meta or {})}, indent=2) + "\n")
    return out_dir


def read_meta(model_dir: str | Path) -> dict:
    return read_json(Path(model_dir) / META_FILE, default={})


@dataclass
class StudentShape:
    """The size of a student encoder. `None` fields are taken from the teacher."""

    layers: int = 4
    hidden: int | None = None
    heads: int | None = None
    ffn: int | None = None
    trim_vocab: bool = True
    #: "cls": a BERT student read out at [CLS]; "mean": a ModernBERT student read out by mean pooling,
    #: which suits shallow students (their [CLS] has few layers to gather the sentence).
    pooling: str = "cls"

    def resolve(self, teacher_config) -> "StudentShape":
        hidden = self.hidden or teacher_config.hidden_size
        head_size = teacher_config.hidden_size // teacher_config.num_attention_heads
        if self.heads:
            heads = self.heads
        elif hidden % head_size == 0:
            heads = hidden // head_size  # the teacher's head size, so heads can be cut from the teacher's
        else:
            heads = max(1, hidden // 64)
        ffn = self.ffn or (teacher_config.intermediate_size * hidden // teacher_config.hidden_size)
        if self.pooling == "mean" and not self.ffn:
            ffn //= 2  # ModernBERT's GeGLU has two input projections of this width
        shape = StudentShape(self.layers, hidden, heads, ffn, self.trim_vocab, self.pooling)
        if shape.pooling not in ("cls", "mean"):
            raise SlmError(f"student pooling must be 'cls' or 'mean', got {shape.pooling!r}")
        if shape.layers < 1:
            raise SlmError(f"student layers must be at least 1, got {shape.layers}")
        if hidden % heads:
            raise SlmError(f"student hidden size {hidden} is not divisible by its {heads} attention heads")
        return shape

    def as_dict(self) -> dict:
        return asdict(self)


def trimmed_vocabulary(tokenizer, texts: Iterable[str], max_length: int) -> list[int]:
    """Teacher token ids to keep: the special tokens, every piece the texts use, and the ASCII
    characters (whole-word and `##` continuation forms) so any later word still tokenizes into
    pieces instead of collapsing to [UNK]. Built from training texts only.
    """
    vocab = tokenizer.get_vocab()
    if getattr(tokenizer.backend_tokenizer.model, "continuing_subword_prefix", None) is None:
        raise SlmError("vocabulary trimming needs a WordPiece tokenizer (BERT-style); use --no-trim-vocab")
    keep = set(tokenizer.all_special_ids)
    for i in range(0, len(texts := list(texts)), 1024):
        for ids in tokenizer(texts[i:i + 1024], truncation=True, max_length=max_length)["input_ids"]:
            keep.update(ids)
    for code in range(33, 127):
        for piece in (chr(code), "##" + chr(code)):
            if piece in vocab:
                keep.add(vocab[piece])
    return sorted(keep)


def _trim_tokenizer(tokenizer, keep_ids: list[int]):
    inverse = {i: t for t, i in tokenizer.get_vocab().items()}
    new_vocab = {inverse[i]: n for n, i in enumerate(keep_ids)}
    kwargs = {k: v for k, v in tokenizer.init_kwargs.items()
              if k in ("do_lower_case", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
                       "bos_token", "eos_token", "tokenize_chinese_chars", "strip_accents")}
    trimmed = type(tokenizer)(vocab=new_vocab, **kwargs)
    if len(trimmed) != len(new_vocab):
        raise SlmError(f"could not rebuild a trimmed {type(tokenizer).__name__}")
    return trimmed


def _embedding_basis(word: torch.Tensor, width: int) -> torch.Tensor:
    """[teacher width, width]: the identity when the widths match, else the top principal directions."""
    return torch.eye(word.shape[1]) if word.shape[1] == width else _pca_basis(word, width)


def _embedding_init_name(word: torch.Tensor, width: int) -> str:
    return "teacher embeddings" if word.shape[1] == width else "PCA of teacher embeddings"


def _pca_basis(matrix: torch.Tensor, dim: int) -> torch.Tensor:
    """The top-`dim` principal directions of the rows of `matrix`, as a [width, dim] projection."""
    centered = matrix - matrix.mean(dim=0, keepdim=True)
    _, _, v = torch.linalg.svd(centered.double(), full_matrices=False)
    return v[:dim].T.to(matrix.dtype)


def build_student(teacher: nn.Module, tokenizer, shape: StudentShape, *, train_texts: list[str] | None = None,
                  max_length: int = 64) -> tuple[nn.Module, object, dict]:
    """Make a student for `teacher`'s labels, sharing (a trimmed copy of) its tokenizer.

    From a BERT or MPNet teacher the student is cut out of every k-th teacher block, keeping the residual
    channels, heads and FFN neurons most active on the training texts (see `models.prune`), whole
    blocks when the width is kept. Other teachers, or head sizes the teacher lacks, give a student
    whose embeddings start from the teacher's (PCA-projected when narrower) and whose blocks start
    from scratch. Returns (student, student_tokenizer, info).
    """
    from transformers import (
        AutoModelForSequenceClassification,
        BertConfig,
        BertForSequenceClassification,
    )

    from smallmighty.models.layer_map import every_kth_layer

    tcfg = teacher.config
    shape = shape.resolve(tcfg)
    if shape.layers > tcfg.num_hidden_layers and shape.hidden == tcfg.hidden_size:
        raise SlmError(f"student has {shape.layers} layers but the teacher only {tcfg.num_hidden_layers}")
    keep_ids = list(range(len(tokenizer)))
    student_tokenizer = tokenizer
    if shape.trim_vocab:
        if not train_texts:
            raise SlmError("vocabulary trimming needs the training texts")
        keep_ids = trimmed_vocabulary(tokenizer, train_texts, max_length)
        student_tokenizer = _trim_tokenizer(tokenizer, keep_ids)
    common = dict(num_labels=tcfg.num_labels, id2label=dict(tcfg.id2label), label2id=dict(tcfg.label2id),
                  pad_token_id=student_tokenizer.pad_token_id)
    if shape.pooling == "mean":
        return _build_mean_pooled_student(teacher, tokenizer, student_tokenizer, keep_ids, shape, max_length, common)
    sizes = dict(vocab_size=len(keep_ids), hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                 num_attention_heads=shape.heads, intermediate_size=shape.ffn)
    if can_prune(tcfg, shape.hidden, shape.heads, shape.ffn, shape.layers):
        # The teacher's own family and settings (activation, LayerNorm epsilon, position scheme), so
        # that the weights cut from it compute the same function.
        config = copy.deepcopy(tcfg)
        positions = max_length + position_offset(tcfg.model_type, tcfg.pad_token_id)
        config.update(dict(**sizes, max_position_embeddings=positions, **common))
        student = AutoModelForSequenceClassification.from_config(config)
        blocks = every_kth_layer(tcfg.num_hidden_layers, shape.layers)
        whole = (shape.hidden, shape.heads, shape.ffn) == (tcfg.hidden_size, tcfg.num_attention_heads,
                                                           tcfg.intermediate_size)
        importance = (_uniform_importance(tcfg) if whole
                      else _measure_importance(teacher, tokenizer, train_texts, max_length))
        student.load_state_dict(pruned_state_dict(teacher, student, importance, blocks, keep_ids), strict=False)
        init = f"teacher blocks {blocks}" + ("" if whole else " pruned to the most active units")
    else:
        student = BertForSequenceClassification(BertConfig(**sizes, max_position_embeddings=max_length, **common))
        init = _init_embeddings_only(teacher, student, keep_ids, max_length)
    return student, student_tokenizer, _student_info(student, teacher, tokenizer, shape, keep_ids, init)


def _init_embeddings_only(teacher: nn.Module, student: nn.Module, keep_ids: list[int], max_length: int) -> str:
    """For students that cannot be cut from the teacher (another family, another head size): a BERT
    student whose embeddings start from the teacher's, projected onto their top principal directions
    when narrower, and whose blocks start from scratch."""
    t_emb, s_emb = teacher.base_model.embeddings, student.bert.embeddings
    word = _teacher_word_embeddings(teacher, keep_ids)
    basis = _embedding_basis(word, student.config.hidden_size)
    with torch.no_grad():
        s_emb.word_embeddings.weight.copy_(word @ basis)
        s_emb.position_embeddings.weight.copy_(t_emb.position_embeddings.weight.detach()[:max_length] @ basis)
        types = getattr(t_emb, "token_type_embeddings", None)
        n_types = s_emb.token_type_embeddings.weight.shape[0]
        if types is not None and types.weight.shape[0] >= n_types:
            s_emb.token_type_embeddings.weight.copy_(types.weight.detach()[:n_types] @ basis)
    return _embedding_init_name(word, student.config.hidden_size)


def _uniform_importance(tcfg) -> Importance:
    """Every unit equally important: used when nothing is cut, so no measurement is needed."""
    blocks = range(tcfg.num_hidden_layers)
    return Importance(torch.ones(tcfg.hidden_size), [torch.ones(tcfg.num_attention_heads) for _ in blocks],
                      [torch.ones(tcfg.intermediate_size) for _ in blocks])


def _measure_importance(teacher: nn.Module, tokenizer, texts: list[str] | None, max_length: int,
                        sample: int = 2048) -> Importance:
    """Activation importance on (a seeded sample of) the training texts: a couple of thousand texts
    rank the units as well as the whole set, in seconds."""
    if not texts:
        raise SlmError("cutting a narrower student out of the teacher needs the training texts")
    chosen = texts if len(texts) <= sample else [texts[i] for i in torch.randperm(
        len(texts), generator=torch.Generator().manual_seed(0))[:sample].tolist()]
    ids = tokenizer(list(chosen), truncation=True, max_length=max_length)["input_ids"]
    return activation_importance(teacher, ids, tokenizer.pad_token_id)


def _student_info(student, teacher, tokenizer, shape: StudentShape, keep_ids: list[int], init: str) -> dict:
    return {"shape": shape.as_dict(), "architecture": type(student).__name__, "vocab_size": len(keep_ids),
            "teacher_vocab_size": len(tokenizer), "init": init, "params": count_parameters(student),
            "teacher_params": count_parameters(teacher)}


def _teacher_word_embeddings(teacher: nn.Module, keep_ids: list[int]) -> torch.Tensor:
    return teacher.get_input_embeddings().weight.detach()[torch.tensor(keep_ids)]


def _build_mean_pooled_student(teacher, tokenizer, student_tokenizer, keep_ids, shape: StudentShape,
                               max_length: int, common: dict):
    """A ModernBERT student (pre-norm, rotary positions, GeGLU) with mean pooling: a standard
    transformers class, so it still loads with AutoModelForSequenceClassification anywhere."""
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    specials = {name: getattr(student_tokenizer, f"{name}_token_id") for name in ("cls", "sep")}
    config = ModernBertConfig(
        vocab_size=len(keep_ids), hidden_size=shape.hidden, intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, max_position_embeddings=max_length,
        global_attn_every_n_layers=1, local_attention=max(2, max_length), classifier_pooling="mean",
        cls_token_id=specials["cls"], sep_token_id=specials["sep"], bos_token_id=specials["cls"],
        eos_token_id=specials["sep"], **common)
    student = ModernBertForSequenceClassification(config)
    word = _teacher_word_embeddings(teacher, keep_ids)
    with torch.no_grad():
        student.get_input_embeddings().weight.copy_(word @ _embedding_basis(word, shape.hidden))
    init = _embedding_init_name(word, shape.hidden)
    return student, student_tokenizer, _student_info(student, teacher, tokenizer, shape, keep_ids, init)

