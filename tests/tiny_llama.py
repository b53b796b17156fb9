"""A tiny random Llama folder shaped like SmolLM2 (and its GGUF), shared by the loader, engine-CLI and serve tests.

A plain module next to conftest.py (pytest puts this folder on sys.path), not a test file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY = dict(hidden=32, ffn=64, layers=2, heads=4, kv_heads=2, max_len=256)


def write_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """Write a random 2-layer Llama with a trained byte-level BPE tokenizer and a ChatML template.

    Shaped like SmolLM2 (specials at ids 0-2, tied embeddings, grouped-query attention) so the
    engine and CLI see the same layout as the real default, at a size that loads in milliseconds.
    """
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["Hello there! What is the capital of France? The capital of France is Paris.",
            "A small model answers short questions about the world, one token at a time."]
    tokenizer.train_from_iterator(text * 20, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()

    h, f, heads, kv = TINY["hidden"], TINY["ffn"], TINY["heads"], TINY["kv_heads"]
    head_dim = h // heads
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    tensors = {"model.embed_tokens.weight": weight(vocab, h), "model.norm.weight": 1 + weight(h) * 0.1}
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": weight(heads * head_dim, h),
            p + "self_attn.k_proj.weight": weight(kv * head_dim, h),
            p + "self_attn.v_proj.weight": weight(kv * head_dim, h),
            p + "self_attn.o_proj.weight": weight(h, heads * head_dim),
            p + "mlp.gate_proj.weight": weight(f, h),
            p + "mlp.up_proj.weight": weight(f, h),
            p + "mlp.down_proj.weight": weight(h, f),
            p + "input_layernorm.weight": 1 + weight(h) * 0.1,
            p + "post_attention_layernorm.weight": 1 + weight(h) * 0.1,
        })
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})

    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": h, "intermediate_size": f, "num_hidden_layers": TINY["layers"],
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
        "max_position_embeddings": TINY["max_len"], "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "rope_theta": 10000.0, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 2, "attention_bias": False, "mlp_bias": False,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "chat_template": CHATML,
        "model_max_length": TINY["max_len"],
    }, indent=2))
    return directory


def write_tiny_gguf(hf_dir: Path, path: Path) -> Path:
    """Write the folder from `write_tiny_llama` as an f32 GGUF, laid out as llama.cpp's converter does."""
    import gguf
    from safetensors.numpy import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])

    by_id = {i: t for t, i in tok["model"]["vocab"].items()} | {a["id"]: a["content"] for a in tok["added_tokens"]}
    tokens = [by_id[i] for i in range(len(by_id))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)

    def permute(w: np.ndarray, heads: int) -> np.ndarray:
        # llama.cpp stores q/k rows interleaved per rotary pair; transformers undoes this on load.
        return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    weights = load_file(str(hf_dir / "model.safetensors"))
    writer.add_tensor("token_embd.weight", weights.pop("model.embed_tokens.weight"))
    writer.add_tensor("output_norm.weight", weights.pop("model.norm.weight"))
    for name, w in sorted(weights.items()):
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        module = rest.removesuffix(".weight")
        if module == "self_attn.q_proj":
            w = permute(w, config["num_attention_heads"])
        elif module == "self_attn.k_proj":
            w = permute(w, config["num_key_value_heads"])
        writer.add_tensor(f"blk.{layer}.{names[module]}.weight", np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
