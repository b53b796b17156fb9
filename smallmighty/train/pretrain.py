"""Pretrain a small Llama-style decoder from scratch on a text corpus (`slm pretrain`).

corpus ──tokenizer (given, or a byte-level BPE trained on the corpus once and cached)──> packed rows
       ──models.build_decoder(shape)──> LlamaForCausalLM ──train.loop.train(CausalLMObjective)──>
       warm-up + cosine, gradient accumulation, validation perplexity every `eval_every` steps (the
       best-scoring weights are kept), atomic checkpoints beside the output, `resume=True` continues a
       killed run exactly ──models.save_decoder──> out/ (standard HF folder: safetensors + tokenizer)

Runs in one process, or several under `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N` (CPUs) or
`accelerate launch` (GPUs): every rank builds the same model from the seed and reads the same
cached token ids; Accelerate shards the rows and averages gradients.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from smallmighty.cache import cache_dir
from smallmighty.data.corpus import source_fingerprint, load_corpus
from smallmighty.data.tokenizer import train_tokenizer
from smallmighty.errors import SlmError
from smallmighty.models.decoder import DecoderShape, build_decoder, decoder_shape, save_decoder
from smallmighty.models.encoder import count_parameters, load_tokenizer
from smallmighty.train.attention import TRAINING_ATTENTION
from smallmighty.train.causal_lm import (
    CausalLMCollator,
    CausalLMObjective,
    perplexity_evaluator,
    resolve_precision,
)
from smallmighty.train.finetune import checkpoint_dir_for
from smallmighty.train.loop import TrainConfig, TrainResult, is_main_process, train


@dataclass
class PretrainConfig:
    """What to train on and how fast; optimisation settings are the loop's `TrainConfig`."""

    seq_len: int = 256
    text_field: str = "text"
    val_fraction: float = 0.1  # the tail of the token stream held out for validation
    val_data: str | None = None  # or a separate validation corpus
    max_val_rows: int = 64  # validation sequences scored at each evaluation (0: all)
    vocab_size: int = 8192  # of the tokenizer trained when none is given
    precision: str = "auto"  # "auto" (bf16 where the CPU has it), "bf16" or "fp32"
    compile: bool = False  # torch.compile the forward and loss
    attention: str = TRAINING_ATTENTION  # attention implementation used while training


def corpus_tokenizer(data: str | Path, vocab_size: int, text_field: str = "text"):
    """A byte-level BPE trained on `data`, made once per corpus content and size, cached."""
    key = hashlib.sha256(f"{source_fingerprint(data, text_field, 'train')}\0{vocab_size}\0{text_field}"
                         .encode()).hexdigest()[:16]
    folder = cache_dir("tokenizers") / f"bpe{vocab_size}-{key}"
    if not (folder / "tokenizer.json").is_file():
        train_tokenizer(data, folder, vocab_size=vocab_size, text_field=text_field)
    return load_tokenizer(str(folder))


def pretrain(data: str | Path, out_dir: str | Path, *, shape: DecoderShape | None = None, tokenizer: str | None = None,
             config: TrainConfig | None = None, settings: PretrainConfig | None = None,
             resume: bool = False) -> TrainResult:
    """Train a decoder of `shape` (default: the "30m" preset) on `data` and save it in `out_dir`.

    `tokenizer` is an HF tokenizer folder or hub id; without one, a byte-level BPE of
    `settings.vocab_size` is trained on `data`. Returns the loop's result (its `module` is the
    objective; `.model` the trained LlamaForCausalLM, also saved in `out_dir`).
    """
    shape = shape or decoder_shape("30m")
    config = config or TrainConfig(lr=3e-4, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.1)
    settings = settings or PretrainConfig()
    if settings.seq_len > shape.max_len:
        raise SlmError(f"seq_len {settings.seq_len} exceeds the model's {shape.max_len} positions")
    precision = resolve_precision(settings.precision)
    tok = load_tokenizer(tokenizer) if tokenizer else corpus_tokenizer(data, settings.vocab_size, settings.text_field)
    corpus = load_corpus(data, tok, settings.seq_len, text_field=settings.text_field,
                         val_fraction=settings.val_fraction, val_source=settings.val_data,
                         progress=is_main_process())
    validation = corpus.validation[: settings.max_val_rows or None]
    model = build_decoder(shape, tok, seed=config.seed)
    collate = CausalLMCollator(tok.pad_token_id)
    objective = CausalLMObjective(model, precision=precision, compile=settings.compile, attention=settings.attention)
    ckpt = checkpoint_dir_for(out_dir)
    params = count_parameters(model)
    if is_main_process():
        print(f"pretrain: {params / 1e6:.1f}M parameters, {corpus.train.shape[0]} x {settings.seq_len} training "
              f"tokens ({corpus.train_tokens:,}), {len(validation)} validation rows, {precision}")
    result = train(objective, corpus.examples(), collate, config, checkpoint_dir=ckpt, resume=resume,
                   desc="pretrain", evaluate=perplexity_evaluator(validation, collate, config.batch_size),
                   select="val_loss", higher_is_better=False, tokens_per_example=settings.seq_len)
    if is_main_process():
        result.module.model.set_attn_implementation("sdpa")  # the inference default
        save_decoder(result.module.model, tok, out_dir, meta={
            "recipe": "pretrain", "data": str(data), "params": params, "shape": asdict(shape),
            "train_tokens_per_epoch": corpus.train_tokens, "train": asdict(config), "settings": asdict(settings),
            "precision": precision, "history": result.history, "best": result.best})
        shutil.rmtree(ckpt, ignore_errors=True)
    return result
