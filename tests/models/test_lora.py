"""LoRA through PEFT: adapters where asked, and a merge that changes no output."""

from __future__ import annotations

import pytest
import torch
from tiny_llama import write_tiny_llama

from smallmighty.errors import SlmError
from smallmighty.models.decoder import save_decoder
from smallmighty.models.lora import LoraSettings, add_lora, merge_lora, trainable_parameters


@pytest.fixture()
def tiny(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = write_tiny_llama(tmp_path / "tiny")
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_adapters_sit_on_the_named_modules_and_only_they_train(tiny) -> None:
    model, _ = tiny
    total = sum(p.numel() for p in model.parameters())
    wrapped = add_lora(model, LoraSettings(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and (".q_proj." in n or ".v_proj." in n) for n in names)
    # 2 layers x (q: 4x32 + 32x4, v: 4x32 + 16x4): the rank-4 matrices and nothing else.
    assert trainable_parameters(wrapped) == 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))
    assert sum(p.numel() for p in wrapped.parameters()) == total + trainable_parameters(wrapped)


def test_unknown_target_modules_are_refused_by_name(tiny) -> None:
    with pytest.raises(SlmError, match=r"qkv_proj not in this model; its linear layers are .*down_proj"):
        add_lora(tiny[0], LoraSettings(target_modules=["qkv_proj"]))
    with pytest.raises(SlmError, match="rank must be a positive integer"):
        add_lora(tiny[0], LoraSettings(rank=0))


def test_merged_model_gives_the_adapted_logits_and_saves_as_a_plain_folder(tiny, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny
    wrapped = add_lora(model, LoraSettings(rank=4, alpha=16))
    torch.manual_seed(0)
    with torch.no_grad():  # fresh adapters are zero (B = 0); make them change the output
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = torch.tensor([[5, 9, 12, 40, 7, 3, 8]])
    with torch.no_grad():
        base = wrapped.get_base_model()
        with wrapped.disable_adapter():
            plain = base(input_ids=ids).logits
        adapted = wrapped(input_ids=ids).logits
        merged_model = merge_lora(wrapped)
        merged = merged_model(input_ids=ids).logits
    assert (adapted - plain).abs().max() > 0.1  # the adapters matter...
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)  # ...and merging keeps them exactly
    assert not any("lora" in n for n, _ in merged_model.named_parameters())

    out = save_decoder(merged_model, tokenizer, tmp_path / "merged", meta={"recipe": "test"})
    assert not list(out.glob("adapter_*")) and (out / "smallmighty.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)
