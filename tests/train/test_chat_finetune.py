"""Chat fine-tuning end to end on a tiny Llama: `slm finetune` (LoRA and full) learns the answers,
saves a plain folder, resumes exactly after a kill, and `slm chat` holds a conversation with the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch import free_port, subprocess_env
from tiny_llama import write_tiny_llama

from smallmighty.cli import main
from smallmighty.data.chat import load_chat
from smallmighty.train.causal_lm import CausalLMObjective
from smallmighty.train.chat import finetune_chat
from smallmighty.train.loop import TrainConfig

REPO = Path(__file__).resolve().parents[2]
QA = [("Hello there!", "Hello! What is the question?"), ("What is the capital of France?", "Paris.")]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("chat-ft") / "tiny")


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("chat-data") / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA] * 8
    rows.append({"turns": ["Hello there!", "Hello! What is the question?", "What is the capital of France?", "Paris."]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def greedy_reply(model_dir: Path, messages: list[dict]) -> str:
    from smallmighty.engine.generate import Engine
    from smallmighty.engine.sampling import GenerationSettings

    engine = Engine.from_pretrained(model_dir)
    return engine.generate_text(engine.apply_chat_template(messages), GenerationSettings(max_new_tokens=12))


@pytest.fixture(scope="module")
def tuned(base, chats, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tuned") / "lora"
    code = main(["finetune", "--model", str(base), "--data", str(chats), "--lora", "--lora-rank", "8",
                 "--lr", "0.02", "--epochs", "60", "--batch-size", "4", "--out", str(out)])
    assert code == 0
    return out


def test_lora_finetune_learns_the_answers_and_saves_a_plain_merged_folder(tuned) -> None:
    from transformers import AutoModelForCausalLM

    assert not list(tuned.glob("adapter_*"))
    meta = json.loads((tuned / "smallmighty.json").read_text())
    assert meta["method"] == "lora" and meta["lora"]["rank"] == 8 and meta["train_conversations"] == 17
    AutoModelForCausalLM.from_pretrained(tuned)  # transformers loads it as it is
    for question, answer in QA:
        assert greedy_reply(tuned, [{"role": "user", "content": question}]) == answer


def test_slm_chat_holds_a_multi_turn_conversation_with_the_tuned_model(tuned) -> None:
    script = "Hello there!\nWhat is the capital of France?\n/exit\n"
    result = subprocess.run([sys.executable, "-m", "smallmighty.cli", "chat", "--model", str(tuned), "--precision",
                             "fp32", "--max-new-tokens", "12"], input=script, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    first, second = out.index("Hello! What is the question?"), out.index("Paris.")
    assert first < second and out.count(" tokens/s; prompt ") == 2  # two replies, the second with the first in its history


def test_full_finetune_resumes_after_a_kill_exactly(base, chats, tmp_path, monkeypatch) -> None:
    config = TrainConfig(max_steps=4, batch_size=2, lr=1e-3, checkpoint_every=2, seed=3)
    whole = finetune_chat(str(base), load_chat(chats), tmp_path / "whole", config=config, pack=False)

    calls = {"n": 0}
    real = CausalLMObjective.forward

    def dies_at_step_3(self, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(CausalLMObjective, "forward", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        finetune_chat(str(base), load_chat(chats), tmp_path / "resumed", config=config, pack=False)
    assert (tmp_path / "resumed.checkpoint" / "state.json").is_file()
    monkeypatch.setattr(CausalLMObjective, "forward", real)
    resumed = finetune_chat(str(base), load_chat(chats), tmp_path / "resumed", config=config, pack=False, resume=True)
    from safetensors.torch import load_file

    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_validation_keeps_the_best_weights_by_perplexity_on_held_out_answers(base, chats, tmp_path) -> None:
    code = main(["finetune", "--model", str(base), "--data", str(chats), "--validation-data", str(chats),
                 "--epochs", "2", "--lr", "0.001", "--batch-size", "4", "--out", str(tmp_path / "out")])
    assert code == 0
    meta = json.loads((tmp_path / "out" / "smallmighty.json").read_text())
    assert meta["method"] == "full" and len(meta["history"]) == 2
    assert meta["best"]["val_ppl"] == min(h["val_ppl"] for h in meta["history"])


def test_bad_chat_data_stops_with_one_line(base, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "robot", "content": "Hi"}]}\n')
    assert main(["finetune", "--model", str(base), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {bad}, line 1, field 'messages[0].role': unknown role 'robot' "
                                               "(expected one of: assistant, system, user)")


def test_lora_finetune_runs_on_two_processes_under_torchrun(base, chats, tmp_path) -> None:
    """ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m smallmighty.cli finetune ...: one merged model saved."""
    out = tmp_path / "ddp"
    env = {**subprocess_env(), "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(free_port()), "-m", "smallmighty.cli", "finetune", "--model", str(base), "--data", str(chats),
                             "--lora", "--max-steps", "2", "--batch-size", "2", "--out", str(out)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved the fine-tuned model") == 2  # both ranks finish; rank 0 writes
    assert json.loads((out / "smallmighty.json").read_text())["method"] == "lora"
    assert not list(tmp_path.glob("ddp.checkpoint"))
