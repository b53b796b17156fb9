"""`slm tokenizer train`: a byte-level BPE tokenizer trained on a text corpus."""

from __future__ import annotations

import argparse

CORPUS_HELP = ("text corpus: a text file, a JSONL file (one document per line, see --text-field), a folder of "
               "them, or a Hugging Face dataset (saved folder or hub name)")

TOKENIZER_EXAMPLES = """examples:
  slm tokenizer train --data ../shared/datasets/tinystories_subset --out runs/tok-8k
  slm tokenizer train --data docs.jsonl --text-field body --vocab-size 16384 --out runs/tok-16k
  slm pretrain --data corpus.txt --tokenizer runs/tok-8k --out runs/lm

The folder holds tokenizer.json and tokenizer_config.json: AutoTokenizer.from_pretrained reads it.
Special tokens (default: <|endoftext|>, <|im_start|>, <|im_end|> at ids 0-2, as SmolLM2) come first;
the first one ends each document and pads.
"""


def add_corpus_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    group = parser.add_argument_group("corpus")
    group.add_argument("--data", required=required, help=CORPUS_HELP)
    group.add_argument("--text-field", default="text", help="JSONL key / dataset column holding the text "
                                                            "(default: text)")


def register(subparsers) -> None:
    tokenizer = subparsers.add_parser("tokenizer", help="train a tokenizer on a text corpus",
                                      description="Tokenizer tools.")
    verbs = tokenizer.add_subparsers(dest="tokenizer_command", metavar="<action>")
    sub = verbs.add_parser("train", help="train a byte-level BPE tokenizer on a corpus",
                           description="Train a byte-level BPE tokenizer (HF tokenizers) on a text corpus and "
                                       "write a standard Hugging Face tokenizer folder.",
                           epilog=TOKENIZER_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_arguments(sub)
    sub.add_argument("--out", required=True, help="output folder")
    sub.add_argument("--vocab-size", type=int, default=8192, help="entries, special tokens included (default: 8192)")
    sub.add_argument("--min-frequency", type=int, default=2, help="merges seen fewer times are not learnt (default: 2)")
    sub.add_argument("--special-tokens", nargs="+", default=None, metavar="TOKEN",
                     help="special tokens, the end-of-document token first (default: <|endoftext|> <|im_start|> "
                          "<|im_end|>)")
    sub.set_defaults(handler=run_train)
    tokenizer.set_defaults(handler=lambda args: tokenizer.print_help() or 0)


def run_train(args: argparse.Namespace) -> int:
    from smallmighty.data.tokenizer import DEFAULT_SPECIAL_TOKENS, train_tokenizer

    out = train_tokenizer(args.data, args.out, vocab_size=args.vocab_size, text_field=args.text_field,
                          min_frequency=args.min_frequency,
                          special_tokens=args.special_tokens or DEFAULT_SPECIAL_TOKENS)
    print(f"saved tokenizer ({args.vocab_size} entries) to {out}")
    return 0
