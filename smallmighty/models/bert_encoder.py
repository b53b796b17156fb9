"""A plain-PyTorch BERT sequence classifier that runs the weights of a Hugging Face
`BertForSequenceClassification` folder, or of an `MPNetForSequenceClassification` one (the same
post-LayerNorm encoder plus a relative-position bias).

Why not just use transformers' model? Two reasons, both measured:
- exporting transformers 5's BERT to ONNX with dynamic shapes gives logits that are wrong by 0.4-1.0,
  while this forward exports exactly (see `smallmighty.compress.onnx_export`);
- the same holds for MPNet, whose log-spaced relative-position buckets come out differently in ONNX
  Runtime's float maths at bucket edges (logits off by ~0.03); here the bucket of every relative
  position is computed once, in torch, and stored, so the export is exact;
- at batch 1 and ~15 tokens, eager latency is mostly per-operator Python overhead, and this forward
  runs fewer operators (no dropout or mask-building machinery, token type folded into the position table).

It only does what a single-sentence classifier needs at inference: no dropout, no token type ids
(always 0), no caches, no cross-attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from smallmighty.errors import SlmError
from smallmighty.io import read_json

#: HF `hidden_act` names this forward implements, mapped to the same maths.
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def position_offset(model_type: str | None, pad_token_id: int | None) -> int:
    """Rows of the position table before the first token's: MPNet counts positions from its
    padding id + 1, BERT from 0."""
    return (1 if pad_token_id is None else pad_token_id) + 1 if model_type == "mpnet" else 0


@dataclass(frozen=True)
class BertShape:
    """The numbers of a BERT classifier, read from an HF config.json."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    layer_norm_eps: float
    hidden_act: str
    num_labels: int
    model_type: str = "bert"
    #: Rows of the position table before the first token's (MPNet: its padding id + 1).
    position_offset: int = 0
    #: Relative-position buckets added to the attention scores (MPNet); 0 = none (BERT).
    relative_buckets: int = 0

    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | Any) -> "BertShape":
        """Read an HF BERT or MPNet config (a `PretrainedConfig` or the dict of its config.json)."""
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        model_type = cfg.get("model_type")
        if model_type not in ("bert", "mpnet"):
            raise SlmError(f"expected a BERT or MPNet config, got model_type {model_type!r}")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise SlmError(f"only absolute position embeddings are supported, got "
                           f"{cfg['position_embedding_type']!r}")
        act = cfg.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise SlmError(f"unsupported hidden_act {act!r}; supported: {', '.join(_ACTIVATIONS)}")
        num_labels = len(cfg["id2label"]) if cfg.get("id2label") else cfg.get("num_labels", 2)
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"], max_positions=cfg["max_position_embeddings"],
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-12), hidden_act=act, num_labels=num_labels,
            model_type=model_type,
            position_offset=position_offset(model_type, cfg.get("pad_token_id")),
            relative_buckets=cfg.get("relative_attention_num_buckets", 32) if model_type == "mpnet" else 0,
        )


class EncoderLayer(nn.Module):
    """Post-LayerNorm transformer layer: x = LN(x + Attn(x)); x = LN(x + FFN(x)).

    Attention is written out (matmul, softmax, matmul) rather than F.scaled_dot_product_attention:
    both export correctly, but SDPA's ONNX graph is ~10% more nodes and measured no faster in ORT.
    """

    def __init__(self, s: BertShape) -> None:
        super().__init__()
        self.num_heads = s.num_heads
        self.query = nn.Linear(s.hidden_size, s.hidden_size)
        self.key = nn.Linear(s.hidden_size, s.hidden_size)
        self.value = nn.Linear(s.hidden_size, s.hidden_size)
        self.attn_out = nn.Linear(s.hidden_size, s.hidden_size)
        self.ln_attn = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.ffn_in = nn.Linear(s.hidden_size, s.intermediate_size)
        self.ffn_out = nn.Linear(s.intermediate_size, s.hidden_size)
        self.ln_ffn = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.act = _ACTIVATIONS[s.hidden_act]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: [batch, seq, hidden]; mask: additive [batch, 1, 1, seq], 0 for tokens, very negative for padding."""
        # Separate Q/K/V projections, as in HF's weights: one stacked QKV matmul measured no faster.
        b, t, c = x.shape
        h, d = self.num_heads, c // self.num_heads
        q = self.query(x).view(b, t, h, d).permute(0, 2, 1, 3)  # [batch, heads, seq, head_dim]
        k = self.key(x).view(b, t, h, d).permute(0, 2, 3, 1)  # [batch, heads, head_dim, seq]
        v = self.value(x).view(b, t, h, d).permute(0, 2, 1, 3)
        scores = torch.matmul(q, k) / math.sqrt(d) + mask
        att = torch.matmul(torch.softmax(scores, dim=-1), v).permute(0, 2, 1, 3).reshape(b, t, c)
        x = self.ln_attn(x + self.attn_out(att))
        return self.ln_ffn(x + self.ffn_out(self.act(self.ffn_in(x))))


def relative_position_buckets(relative: torch.Tensor, num_buckets: int, max_distance: int = 128) -> torch.Tensor:
    """MPNet's (T5's bidirectional) buckets for key position minus query position: half the buckets
    per direction, exact up to a quarter of them, log-spaced beyond up to `max_distance`."""
    half = num_buckets // 2
    exact = half // 2
    n = relative.abs()
    far = exact + (torch.log(n.float() / exact) / math.log(max_distance / exact) * (half - exact)).to(torch.long)
    far = torch.clamp(far, max=half - 1)
    return (relative > 0).to(torch.long) * half + torch.where(n < exact, n, far)


class BertClassifier(nn.Module):
    """Embeddings -> encoder layers -> tanh pooler on [CLS] -> linear classifier, returning logits."""

    def __init__(self, s: BertShape) -> None:
        super().__init__()
        self.shape = s
        self.word = nn.Embedding(s.vocab_size, s.hidden_size)
        # Position table with token type 0 already added: a single sentence never uses type 1.
        self.position = nn.Embedding(s.max_positions, s.hidden_size)
        self.ln_emb = nn.LayerNorm(s.hidden_size, eps=s.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(s) for _ in range(s.num_layers))
        self.pooler = nn.Linear(s.hidden_size, s.hidden_size)
        self.classifier = nn.Linear(s.hidden_size, s.num_labels)
        if s.relative_buckets:
            self.relative = nn.Embedding(s.relative_buckets, s.num_heads)
            longest = s.max_positions - s.position_offset
            # Bucket of every relative position -(longest-1)..longest-1, fixed once in torch's maths.
            self.register_buffer("relative_index", relative_position_buckets(
                torch.arange(-(longest - 1), longest), s.relative_buckets), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: int64 [batch, seq] -> logits float32 [batch, num_labels]."""
        t = input_ids.shape[1]
        offset = self.shape.position_offset
        x = self.ln_emb(self.word(input_ids) + self.position.weight[offset: offset + t])
        dtype = x.dtype
        mask = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        if self.shape.relative_buckets:
            positions = torch.arange(t, device=input_ids.device)
            longest = self.shape.max_positions - self.shape.position_offset
            relative = positions[None, :] - positions[:, None] + (longest - 1)
            mask = mask + self.relative(self.relative_index[relative]).permute(2, 0, 1)  # [heads, q, k]
        for layer in self.layers:
            x = layer(x, mask)
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


def _mpnet_to_ours(shape: BertShape, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename HF `MPNetForSequenceClassification` tensors to ours (its head is our pooler + classifier)."""
    e = "mpnet.embeddings."
    out = {
        "word.weight": sd[e + "word_embeddings.weight"], "position.weight": sd[e + "position_embeddings.weight"],
        "ln_emb.weight": sd[e + "LayerNorm.weight"], "ln_emb.bias": sd[e + "LayerNorm.bias"],
        "relative.weight": sd["mpnet.encoder.relative_attention_bias.weight"],
        "pooler.weight": sd["classifier.dense.weight"], "pooler.bias": sd["classifier.dense.bias"],
        "classifier.weight": sd["classifier.out_proj.weight"], "classifier.bias": sd["classifier.out_proj.bias"],
    }
    names = {"query": "attention.attn.q", "key": "attention.attn.k", "value": "attention.attn.v",
             "attn_out": "attention.attn.o", "ln_attn": "attention.LayerNorm", "ffn_in": "intermediate.dense",
             "ffn_out": "output.dense", "ln_ffn": "output.LayerNorm"}
    for i in range(shape.num_layers):
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                out[f"layers.{i}.{ours}.{p}"] = sd[f"mpnet.encoder.layer.{i}.{theirs}.{p}"]
    return out


def _hf_to_ours(shape: BertShape, sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and stack/fold where needed) HF `BertForSequenceClassification` tensors to ours."""
    if shape.model_type == "mpnet":
        return _mpnet_to_ours(shape, sd)
    e = "bert.embeddings."
    out = {
        "word.weight": sd[e + "word_embeddings.weight"],
        "position.weight": sd[e + "position_embeddings.weight"] + sd[e + "token_type_embeddings.weight"][0],
        "ln_emb.weight": sd[e + "LayerNorm.weight"], "ln_emb.bias": sd[e + "LayerNorm.bias"],
        "pooler.weight": sd["bert.pooler.dense.weight"], "pooler.bias": sd["bert.pooler.dense.bias"],
        "classifier.weight": sd["classifier.weight"], "classifier.bias": sd["classifier.bias"],
    }
    for i in range(shape.num_layers):
        h, o = f"bert.encoder.layer.{i}.", f"layers.{i}."
        for p in ("weight", "bias"):
            for n in ("query", "key", "value"):
                out[f"{o}{n}.{p}"] = sd[f"{h}attention.self.{n}.{p}"]
            out[o + "attn_out." + p] = sd[f"{h}attention.output.dense.{p}"]
            out[o + "ln_attn." + p] = sd[f"{h}attention.output.LayerNorm.{p}"]
            out[o + "ffn_in." + p] = sd[f"{h}intermediate.dense.{p}"]
            out[o + "ffn_out." + p] = sd[f"{h}output.dense.{p}"]
            out[o + "ln_ffn." + p] = sd[f"{h}output.LayerNorm.{p}"]
    return out


def from_hf_state_dict(config: Mapping[str, Any] | Any,
                       state_dict: Mapping[str, torch.Tensor]) -> BertClassifier:
    """Build a `BertClassifier` in eval mode holding the exact tensors of an HF BERT classifier.

    `config` is an HF `BertConfig` or the dict of its config.json; `state_dict` uses HF's names
    (`bert.embeddings...`, `classifier.weight`), as in a saved model.safetensors.
    """
    shape = BertShape.from_hf(config)
    if not any(name.startswith("classifier.") for name in state_dict):
        raise SlmError("the weights have no classifier head: not a sequence classifier")
    try:
        ours = _hf_to_ours(shape, state_dict)
    except KeyError as missing:
        raise SlmError(f"the weights lack the BERT tensor {missing}") from None
    model = BertClassifier(shape)
    try:
        model.load_state_dict(ours, strict=True)
    except RuntimeError as err:  # shape mismatch between config.json and the tensors
        raise SlmError(f"the weights do not match config.json: {err}") from None
    return model.eval()


def load_bert_classifier(model_dir: str | Path) -> BertClassifier:
    """Load a saved HF `BertForSequenceClassification` folder (config.json + model.safetensors)."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise SlmError(f"model directory not found: {model_dir}")
    config_path, weights_path = model_dir / "config.json", model_dir / "model.safetensors"
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise SlmError(f"{model_dir} is not a saved classifier: {needed.name} is missing")
    config = read_json(config_path)
    try:
        return from_hf_state_dict(config, load_file(weights_path))
    except SlmError as err:
        raise SlmError(f"{model_dir}: {err}") from None


class HFClassifierForward(nn.Module):
    """Any other Hugging Face sequence classifier as `(input_ids, attention_mask) -> logits`.

    Used for architectures without a hand-written forward (e.g. ModernBERT, whose mean pooling
    suits small students); its ONNX export is verified against torch like every other.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()
        cfg = model.config
        self.shape = BertShape(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                               num_layers=cfg.num_hidden_layers, num_heads=cfg.num_attention_heads,
                               intermediate_size=cfg.intermediate_size, max_positions=cfg.max_position_embeddings,
                               layer_norm_eps=getattr(cfg, "norm_eps", 0.0),
                               hidden_act=getattr(cfg, "hidden_activation", "gelu"), num_labels=cfg.num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def load_classifier_forward(model_dir: str | Path) -> nn.Module:
    """The fastest plain forward for a saved classifier: ours for BERT and MPNet, transformers' otherwise."""
    model_dir = Path(model_dir)
    model_type = read_json(model_dir / "config.json", default={}).get("model_type")
    if model_type in (None, "bert", "mpnet"):
        return load_bert_classifier(model_dir)
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32,
                                                                   trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise SlmError(f"{model_dir}: cannot load the classifier ({err})") from None
    return HFClassifierForward(model)
