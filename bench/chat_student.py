"""Headline claim: a small student tuned on a teacher's answers answers much more like the teacher
(Orca 2's recipe, on a CPU).

The teacher (SmolLM2-135M-Instruct by default) answers prompts of the ChatterBot corpus with our
engine (int8, batched, greedy; a teacher the engine cannot run answers through transformers). The
prompts are the corpus's distinct first user turns, shuffled with a fixed seed and split once:
held-out test prompts, validation prompts (they choose the weights kept during tuning) and training
prompts. A student with at most half the teacher's
parameters is tuned on the training prompts and the teacher's answers twice, with LoRA and fully;
before and after, it answers the test prompts greedily and is scored against the teacher's answers
(ROUGE-L) and on them (perplexity of the answer tokens). With --warm-up-data, the student is first
tuned on human-written conversations (those opening with a held-out prompt left out), so that
"before" is a student that already chats rather than a freshly cut one.

    python bench/chat_student.py --student runs/student-cut          # a student folder
    python bench/chat_student.py --student runs/student-cut \
        --warm-up-data ../shared/datasets/chatterbot_corpus_en/conversations.jsonl
    python bench/chat_student.py --teacher path/to/gemma-3-270m.gguf --student <SmolLM2 folder or GGUF>
    python bench/chat_student.py --quick ...                        # a smoke run

Prints a table per row and ends with one JSON line of figures, among them how many held-out answers
end with an end-of-turn token rather than at the token limit (`teacher_ended`, `ended_before`,
`ended_after`, `ended_after_<row>`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from smallmighty.data.chat import ChatData, load_chat, prompts_of
from smallmighty.distill.answers import TeacherSettings
from smallmighty.distill.from_answers import learn_from_answers
from smallmighty.models.lora import LoraSettings
from smallmighty.train.loop import TrainConfig

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "chatterbot_corpus_en" / "pairs.jsonl"


def split_prompts(path: Path, n_train: int, n_val: int, n_test: int, seed: int) -> tuple[list, list, list]:
    import random

    prompts = prompts_of(load_chat(path))
    random.Random(seed).shuffle(prompts)
    if n_train + n_val + n_test > len(prompts):
        raise SystemExit(f"{path} has {len(prompts)} distinct prompts, fewer than {n_train + n_val + n_test}")
    return prompts[n_test + n_val:n_test + n_val + n_train], prompts[n_test:n_test + n_val], prompts[:n_test]


def warm_up(student: str, data_path: Path, held_out: list, out: Path, epochs: int, lr: float, seed: int) -> str:
    """The student's first lessons: full fine-tuning on the human-written replies of `data_path`
    (conversations that open with a held-out prompt left out), so that the student talks before the
    teacher teaches it. Reused when `out` already holds it."""
    from smallmighty.train.chat import finetune_chat

    if (out / "config.json").is_file():
        print(f"warm-up: reusing {out}")
        return str(out)
    data = load_chat(data_path)
    unseen = {json.dumps(p) for p in held_out}
    kept = [c for c in data.conversations if json.dumps(c.messages[:1]) not in unseen]
    print(f"warm-up: the student learns {len(kept)} human-written conversations of {data_path} "
          f"({len(data) - len(kept)} that open with a held-out prompt left out)")
    config = TrainConfig(epochs=epochs, batch_size=8, lr=lr, seed=seed, schedule="cosine", warmup_ratio=0.05,
                         checkpoint_every=0)
    finetune_chat(student, ChatData(kept, data.source, data.skipped, data.first_skipped), out, config=config)
    return str(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=None, help="teacher model (default: SmolLM2-135M-Instruct from PyPI)")
    parser.add_argument("--student", required=True, help="student model folder, GGUF or hub id")
    parser.add_argument("--data", type=Path, default=DATA, help="chat data whose prompts the teacher answers")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/chat-student"))
    parser.add_argument("--train", type=int, default=600, help="training prompts (default: 600)")
    parser.add_argument("--val", type=int, default=48, help="validation prompts (default: 48)")
    parser.add_argument("--test", type=int, default=100, help="held-out test prompts (default: 100)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--teacher-system", default=None, help="system prompt the teacher alone sees")
    parser.add_argument("--teacher-chat-template", type=Path, default=None,
                        help="jinja template for a teacher without one (recipes/chat_templates/gemma.jinja)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8, help="packed rows per step")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--full-lr", type=float, default=1e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--rows", default="lora,full", help="which tunings to run (default: lora,full)")
    parser.add_argument("--warm-up-data", type=Path, default=None,
                        help="chat data the student is first tuned on (human replies), before the teacher teaches "
                             "it, e.g. ChatterBot's conversations.jsonl (default: none)")
    parser.add_argument("--warm-up-epochs", type=int, default=1)
    parser.add_argument("--warm-up-lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 32/8/16 prompts, 1 epoch, 32 new tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.train, args.val, args.test, args.epochs, args.max_new_tokens = 32, 8, 16, 1, 32

    started = time.perf_counter()
    train, val, test = split_prompts(args.data, args.train, args.val, args.test, args.seed)
    print(f"prompts: {len(train)} train / {len(val)} validation / {len(test)} test from {args.data}")
    student, warm_s = args.student, 0.0
    if args.warm_up_data:
        start = time.perf_counter()
        student = warm_up(args.student, args.warm_up_data, val + test, args.out / "student-warm",
                          args.warm_up_epochs, args.warm_up_lr, args.seed)
        warm_s = time.perf_counter() - start
    teacher_settings = TeacherSettings(max_new_tokens=args.max_new_tokens, system_prompt=args.teacher_system,
                                       chat_template=args.teacher_chat_template.read_text()
                                       if args.teacher_chat_template else None)
    rows = {}
    for row in args.rows.split(","):
        lora = LoraSettings(rank=args.rank, alpha=args.alpha) if row == "lora" else None
        config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, schedule="cosine",
                             lr=args.lora_lr if lora else args.full_lr, warmup_ratio=0.05, checkpoint_every=0)
        card = learn_from_answers(args.teacher, student, train, test, args.out / row,
                                  teacher_settings=teacher_settings, config=config, lora=lora,
                                  max_length=args.max_length, validation_prompts=val, answers_dir=args.out,
                                  title=f"Learning from a teacher's answers ({row})")
        teacher, before, after = card["models"]
        rows[row] = {"before": before, "after": after, "teacher": teacher,
                     "tune_s": card["training"]["timings_s"]["tune_s"]}
        print(f"\n[{row}] ROUGE-L vs teacher {before['rouge_l']:.3f} -> {after['rouge_l']:.3f}; answer perplexity "
              f"{before['answer_ppl']:.2f} -> {after['answer_ppl']:.2f}; tuned in {rows[row]['tune_s']:.0f} s; "
              f"report {args.out / row / 'report.html'}")
    first = rows[args.rows.split(",")[0]]
    figures = {
        "teacher": str(args.teacher or "SmolLM2-135M-Instruct"), "student": args.student,
        "warm_up_data": str(args.warm_up_data) if args.warm_up_data else None, "warm_up_seconds": round(warm_s, 1),
        "teacher_params": first["teacher"]["params"], "student_params": first["before"]["params"],
        "train_prompts": len(train), "val_prompts": len(val), "test_prompts": len(test),
        "rouge_l_before": round(first["before"]["rouge_l"], 4),
        "answer_ppl_before": round(first["before"]["answer_ppl"], 3),
        "teacher_ended": first["teacher"]["ended"], "ended_before": first["before"]["ended"],
    }
    for name, r in rows.items():
        suffix = "" if r is first else f"_{name}"
        figures.update({f"rouge_l_after{suffix}": round(r["after"]["rouge_l"], 4),
                        f"answer_ppl_after{suffix}": round(r["after"]["answer_ppl"], 3),
                        f"ended_after{suffix}": r["after"]["ended"], f"tune_seconds{suffix}": round(r["tune_s"], 1)})
    before = figures["rouge_l_before"]
    figures["rouge_l_ratio"] = float(f"{figures['rouge_l_after'] / before:.4g}") if before else None
    figures["answer_ppl_ratio"] = float(f"{figures['answer_ppl_after'] / figures['answer_ppl_before']:.4g}")
    figures["total_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
