"""Shared fixtures: where the real datasets live, and small local models built on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Every test run gets its own smallmighty cache (converted models, quantized weights, ONNX exports,
# compiled kernels), so tests never read a stale entry from, nor write into, the user's cache.
# Subprocesses (the CLI tests) inherit it.
if "SLM_TEST_KEEP_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["SLM_CACHE_DIR"] = tempfile.mkdtemp(prefix="slm-test-cache-")
    atexit.register(shutil.rmtree, os.environ["SLM_CACHE_DIR"], True)


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The real datasets beside the checkout (`../shared/datasets`), or $SLM_SHARED_DATASETS."""
    path = Path(os.environ.get("SLM_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))
    if not path.is_dir():
        pytest.skip(f"real datasets not found at {path}")
    return path


@pytest.fixture(scope="session")
def stories(shared_datasets) -> Path:
    """TinyStories (one text file), the corpus the causal-LM tests pretrain and distil on."""
    return shared_datasets / "tinystories_subset" / "tinystories_subset.txt"


TOPICS = {
    "weather": ["rain", "sunny", "cloudy", "storm", "snow", "windy", "forecast", "cold"],
    "food": ["pizza", "pasta", "salad", "bread", "cheese", "soup", "dinner", "lunch"],
    "sport": ["football", "tennis", "match", "goal", "team", "race", "coach", "score"],
}


def synthetic_topic_rows(n_per_label: int, seed: int) -> list[dict]:
    """An easy, learnable 3-topic task: each text mixes filler words with words of its topic."""
    import random

    rng = random.Random(seed)
    filler = ["the", "a", "today", "we", "really", "think", "about", "this", "very", "and", "my", "friend"]
    rows = []
    for label, words in TOPICS.items():
        for _ in range(n_per_label):
            text = rng.sample(filler, 3) + rng.sample(words, 2) + rng.sample(filler, 2)
            rng.shuffle(text)
            rows.append({"text": " ".join(text), "label": label})
    rng.shuffle(rows)
    return rows


@pytest.fixture(scope="session")
def topic_data_dir(tmp_path_factory) -> Path:
    """A folder with train.jsonl / test.jsonl of the synthetic topic task."""
    import json

    root = tmp_path_factory.mktemp("topics")
    for split, n, seed in (("train", 80, 0), ("test", 20, 1)):
        with open(root / f"{split}.jsonl", "w") as f:
            for row in synthetic_topic_rows(n, seed):
                f.write(json.dumps(row) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    """A small random BERT encoder (2 layers, width 64) with the MiniLM tokenizer: a fast stand-in
    for a pretrained teacher that tests can fine-tune and distil in seconds."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from smallmighty.defaults import default_teacher_encoder

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny-encoder")
    tokenizer = AutoTokenizer.from_pretrained(default_teacher_encoder())
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128)
    BertModel(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


STORY = ("Once upon a time there was a little cat. The cat liked to play in the sun. "
         "One day the cat met a dog, and they became good friends.")


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory) -> Path:
    """A 400-entry byte-level BPE (`slm tokenizer train`'s kind: <|endoftext|> at id 0 ends documents)."""
    from smallmighty.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("bpe")
    (root / "text.txt").write_text("\n\n".join([STORY] * 20), encoding="utf-8")
    return train_tokenizer(root / "text.txt", root / "tokenizer", vocab_size=400)
