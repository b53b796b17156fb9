"""Distil a causal language model into a small student (`slm distill` with a causal-LM teacher).

The recipe, in order:

1. The teacher (any HF causal LM folder, hub id or GGUF file) tokenises the corpus once
   (`data.corpus.load_corpus`: packed rows with EOS between documents, a validation tail).
2. The student: an existing model folder (`student`), or cut out of a Llama-family teacher
   (`models.decoder_prune`: the most influential blocks, the most active channels, whole GQA groups
   and SwiGLU neurons), or the same shape from random weights (`init="random"`). Its vocabulary is
   trimmed to the tokens the training split uses (`models.bpe_trim`): the training rows are the
   teacher's, renumbered, and the student's text is the teacher's token for token.
3. One of three methods:
   - "kd" (token-level KD on the corpus): the teacher runs once over the training rows and its
     top-k next-token distribution per position is cached on disk (`teacher_cache`); the teacher
     then leaves memory and the student trains on a divergence to it (`lm_losses`: forward KL,
     reverse KL or generalised JSD, temperature), plus optional hard-label cross-entropy and
     hidden-state matching through the layer map;
   - "gkd" (on-policy, Agarwal et al. 2024): at each step, with probability `on_policy_ratio` (the
     GKD lambda) the student continues prompts from the corpus by sampling and the teacher scores
     the student's own text; otherwise the step is token-level KD on corpus rows. The teacher stays
     in memory;
   - "sequence" (sequence-level KD, Kim & Rush 2016): the teacher continues prompts from the corpus
     with our engine (batched, `engine.generate.Engine`) and the student learns those texts by plain
     next-token prediction, re-tokenised with its own tokenizer, so this works across tokenizers.
4. `train.loop.train` runs it (Accelerate; checkpoints, `resume`), keeping the weights with the best
   validation perplexity; the student is saved as a standard HF folder (`models.decoder.save_decoder`)
   that our engine and transformers both load.

Token-level methods need one vocabulary: a student with another tokenizer is refused with a message
naming both (`distill.vocabulary`).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from smallmighty.cache import content_fingerprint
from smallmighty.data.corpus import PackedCorpus, load_corpus, pack, tokenize_corpus
from smallmighty.distill.losses import DistillWeights, HiddenProjection, hidden_state_mse
from smallmighty.distill.lm_losses import TeacherTopK, divergence_beta, teacher_topk, token_divergence
from smallmighty.distill.teacher_cache import CacheSpec, TeacherCache, build_lm_teacher_cache, lm_cache_path
from smallmighty.distill.vocabulary import shared_vocabulary
from smallmighty.errors import SlmError
from smallmighty.io import write_text
from smallmighty.models.bpe_trim import TrimmedVocab, trim_bpe_tokenizer
from smallmighty.models.causal_lm import load_hf_causal_lm, resolve_causal_lm
from smallmighty.models.decoder import save_decoder
from smallmighty.models.decoder_prune import (
    DecoderCut,
    can_cut,
    cut_decoder,
    decoder_importance,
    kept_blocks,
    student_config,
)
from smallmighty.models.encoder import count_parameters, load_tokenizer
from smallmighty.models.layer_map import parse_layer_map
from smallmighty.train.attention import register_training_attention
from smallmighty.train.causal_lm import (
    CausalLMCollator,
    CausalLMObjective,
    causal_lm_loss,
    perplexity_evaluator,
    resolve_precision,
)
from smallmighty.train.finetune import checkpoint_dir_for
from smallmighty.train.loop import TrainConfig, TrainResult, is_main_process, train, wait_for_everyone

METHODS = ("kd", "gkd", "sequence")
#: Training rows the teacher's activations are measured on to choose what a cut student keeps.
IMPORTANCE_ROWS = 32


@dataclass
class LMDistillConfig:
    """Everything that defines a causal-LM distillation run besides the teacher and the corpus."""

    method: str = "kd"
    divergence: str = "forward_kl"  # forward_kl, reverse_kl or jsd
    beta: float = 0.5  # jsd only: 0 is forward KL, 1 reverse KL
    weights: DistillWeights = field(default_factory=lambda: DistillWeights(kd=1.0, ce=0.0, temperature=1.0))
    top_k: int = 32  # teacher tokens kept per position (the rest of its mass is one tail bucket)
    layer_map: str = "uniform"  # for hidden-state matching (weights.hidden > 0)
    cut: DecoderCut = field(default_factory=DecoderCut)
    init: str = "cut"  # "cut" from the teacher, or "random" weights of the same shape
    student: str | None = None  # or start from this causal-LM folder (its own shape and tokenizer)
    trim_vocab: bool = True
    seq_len: int = 256
    text_field: str = "text"
    val_fraction: float = 0.1
    val_data: str | None = None
    max_val_rows: int = 64  # validation rows scored at each evaluation (0: all)
    precision: str = "auto"  # bf16 autocast for student and teacher passes where the CPU has it
    on_policy_ratio: float = 0.5  # gkd: share of steps on the student's own samples (GKD's lambda)
    prompt_tokens: int = 32  # gkd and sequence: corpus tokens the continuations start from
    sample_temperature: float = 1.0  # gkd and sequence: sampling temperature of the continuations
    sequences: int = 0  # sequence: teacher continuations to make (0: one per training row)
    teacher_precision: str = "int8"  # sequence: the engine precision the teacher generates at
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=1, batch_size=8, lr=1e-3, weight_decay=0.1, warmup_ratio=0.05, schedule="cosine",
        min_lr_ratio=0.1))

    def validate(self) -> None:
        if self.method not in METHODS:
            raise SlmError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        divergence_beta(self.divergence, self.beta)
        self.weights.validate()
        if self.weights.attention:
            raise SlmError("attention-map transfer is for encoder classifiers; causal-LM distillation matches "
                           "logits and hidden states (set the attention weight to 0)")
        self.train.validate()
        if self.init not in ("cut", "random"):
            raise SlmError(f"init must be 'cut' or 'random', got {self.init!r}")
        if self.top_k < 1:
            raise SlmError(f"top_k must be at least 1, got {self.top_k}")
        if not 0 <= self.on_policy_ratio <= 1:
            raise SlmError(f"on_policy_ratio must be in [0, 1], got {self.on_policy_ratio}")
        if not 1 <= self.prompt_tokens < self.seq_len:
            raise SlmError(f"prompt_tokens must be in [1, seq_len={self.seq_len}), got {self.prompt_tokens}")
        if not self.sample_temperature > 0:
            raise SlmError(f"sample_temperature must be > 0, got {self.sample_temperature}")
        if self.sequences < 0:
            raise SlmError(f"sequences must be 0 or more, got {self.sequences}")


# ---------------------------------------------------------------------------------------------- data


@dataclass
class StudentData:
    """The student's training and validation rows, [rows, seq_len] in student ids."""

    train: torch.Tensor
    validation: torch.Tensor


def _student_rows(corpus: PackedCorpus, teacher_tok, student_tok, data: str, config: LMDistillConfig,
                  vocab: TrimmedVocab | None) -> StudentData:
    """The student's rows: the teacher's when they share a tokenizer; else its own tokenisation.

    With a trimmed vocabulary every training id is kept, so the training rows are the teacher's
    renumbered (exactly what the trimmed tokenizer makes of that text). The validation tail may
    hold words the training split lacks, which the student splits into smaller pieces: it is
    tokenised afresh, as is everything for a student with another tokenizer.
    """
    same = student_tok is teacher_tok or (vocab is None and student_tok.get_vocab() == teacher_tok.get_vocab())
    if same:
        return StudentData(corpus.train, corpus.validation)
    own = load_corpus(data, student_tok, config.seq_len, text_field=config.text_field, val_fraction=config.val_fraction,
                      val_source=config.val_data, progress=is_main_process())
    if vocab is None:
        return StudentData(own.train, own.validation)
    lookup = torch.full((max(len(teacher_tok), int(corpus.train.max()) + 1),), -1, dtype=torch.long)
    lookup[torch.tensor(vocab.teacher_ids)] = torch.arange(len(vocab.teacher_ids))
    return StudentData(lookup[corpus.train], own.validation)


# ---------------------------------------------------------------------------------------------- student


def build_lm_student(teacher: nn.Module, teacher_tok, teacher_name: str, train_rows: torch.Tensor,
                     config: LMDistillConfig) -> tuple[nn.Module, object, TrimmedVocab | None, torch.Tensor | None, dict]:
    """(student, its tokenizer, trimmed vocabulary or None, teacher columns or None, facts about it).

    `columns[i]` is the teacher id of student id i wherever token-level KD is possible; None when
    the tokenizers differ (only sequence-level KD can teach such a student).
    """
    from transformers import AutoModelForCausalLM

    if config.student:
        student_dir = resolve_causal_lm(config.student)
        student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
        student_tok = load_tokenizer(str(student_dir))
        columns = None
        if config.method != "sequence":
            shared = shared_vocabulary(teacher_tok, student_tok, teacher_name=teacher_name, student_name=str(student_dir))
            columns = torch.arange(min(shared, teacher.config.vocab_size, student.config.vocab_size))
        return student, student_tok, None, columns, {"init": f"from {student_dir}"}
    if not can_cut(teacher.config):
        raise SlmError(f"the teacher is a '{teacher.config.model_type}' model, which a student cannot be cut from "
                       "or shaped after; give a student folder (--student), e.g. one made by `slm pretrain`")
    vocab = None
    student_tok, keep_ids = teacher_tok, None
    if config.trim_vocab:
        vocab = trim_bpe_tokenizer(teacher_tok, torch.unique(train_rows).tolist())
        student_tok, keep_ids = vocab.tokenizer, vocab.teacher_ids
    token_ids = {name: student_tok.convert_tokens_to_ids(getattr(student_tok, token))
                 for name, token in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"),
                                     ("pad_token_id", "pad_token")) if getattr(student_tok, token, None)}
    facts: dict = {}
    if config.init == "cut":
        importance = decoder_importance(teacher, train_rows[:IMPORTANCE_ROWS])
        student = cut_decoder(teacher, config.cut, importance, keep_ids, token_ids)
        init = "cut from the teacher's most influential blocks and most active units"
        facts["blocks"] = kept_blocks(importance, student.config.num_hidden_layers)
    else:
        cut = config.cut.resolve(teacher.config)
        vocab_size = len(keep_ids) if keep_ids is not None else teacher.config.vocab_size
        student = AutoModelForCausalLM.from_config(student_config(teacher.config, cut, vocab_size, token_ids),
                                                   dtype=torch.float32)
        init = "random"
    columns = (torch.tensor(keep_ids) if keep_ids is not None
               else torch.arange(min(len(teacher_tok), teacher.config.vocab_size)))
    return student, student_tok, vocab, columns, {"init": init, "cut": config.cut.resolve(teacher.config).as_dict(),
                                                  **facts}


# ---------------------------------------------------------------------------------------------- objectives


class IndexedCollator:
    """`CausalLMCollator` plus each row's position in the training set (to find its teacher outputs)."""

    def __init__(self, pad_token_id: int) -> None:
        self.collate = CausalLMCollator(pad_token_id)

    def __call__(self, examples: list[dict]) -> dict:
        return {**self.collate(examples), "index": torch.tensor([e["index"] for e in examples])}


class TeacherScorer:
    """The teacher as a function from student ids to `TeacherTopK`, for on-policy steps.

    A plain class rather than a module: the teacher must not join the student's parameters,
    optimizer, checkpoints or DDP wrapper.
    """

    def __init__(self, teacher: nn.Module, columns: torch.Tensor, temperature: float, top_k: int, bf16: bool) -> None:
        self.teacher, self.columns = teacher.eval().requires_grad_(False), columns
        self.temperature, self.top_k, self.bf16 = temperature, top_k, bf16

    @torch.no_grad()
    def __call__(self, student_ids: torch.Tensor) -> TeacherTopK:
        device = student_ids.device
        self.teacher.to(device)
        columns = self.columns.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.teacher(input_ids=columns[student_ids]).logits
        return teacher_topk(logits, self.temperature, self.top_k, columns)


class LMDistillObjective(nn.Module):
    """The student plus hidden-state projections; `forward(batch)` returns the distillation loss.

    Corpus rows are distilled from the teacher cache ("kd") or from the live teacher ("gkd"); in
    "gkd", with probability `on_policy_ratio` a step instead samples continuations from the
    student and distils the teacher's view of them (no hard labels there: the text is the student's).
    """

    def __init__(self, student: nn.Module, config: LMDistillConfig, *, cache: TeacherCache | None = None,
                 scorer: TeacherScorer | None = None, layer_map: list[tuple[int, int]] | None = None,
                 teacher_hidden: int = 0, pad_token_id: int = 0) -> None:
        super().__init__()
        self.student = student
        # As `CausalLMObjective`: the training attention is faster on CPU than SDPA; set once here, so
        # every step of a run (resumed or not) uses the same kernels.
        student.set_attn_implementation(register_training_attention())
        self.config = config
        self.cache, self.scorer = cache, scorer
        self.beta = divergence_beta(config.divergence, config.beta)
        self.bf16 = resolve_precision(config.precision) == "bf16"
        self.layer_map = layer_map or []
        self.pad_token_id = pad_token_id
        if config.weights.hidden:
            self.projection = HiddenProjection(student.config.hidden_size, teacher_hidden, len(self.layer_map))

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        w = self.config.weights
        ids = batch["input_ids"]
        on_policy = self.scorer is not None and bool(torch.rand(()) < self.config.on_policy_ratio)
        mask = None
        if on_policy:
            ids = self._sample(ids)
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[:, self.config.prompt_tokens - 1:] = True  # the positions that predict the student's tokens
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.student(input_ids=ids, output_hidden_states=bool(w.hidden))
        cached = None
        if self.scorer is not None:
            teacher = self.scorer(ids)
        else:
            cached = self.cache.batch(batch["index"].cpu(), ids.shape[1])
            teacher = TeacherTopK(cached["topk_values"], cached["topk_indices"], cached["tail"]).to(ids.device)
        parts = {"kd": token_divergence(out.logits, teacher, temperature=w.temperature, beta=self.beta, mask=mask)}
        if w.ce and not on_policy:
            parts["ce"] = causal_lm_loss(out.logits, batch["labels"])
        if w.hidden and cached is not None:
            every = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
            parts["hidden"] = sum(
                hidden_state_mse(out.hidden_states[s], cached["hidden"][t].to(ids.device), every,
                                 self.projection.layers[i])
                for i, (s, t) in enumerate(self.layer_map)) / len(self.layer_map)
        loss = sum(getattr(w, name) * value for name, value in parts.items())
        return loss, {name: value.item() for name, value in parts.items()}

    @torch.no_grad()
    def _sample(self, rows: torch.Tensor) -> torch.Tensor:
        """Keep each row's first `prompt_tokens` and let the student sample the rest (no early stop)."""
        prompts = rows[:, :self.config.prompt_tokens]
        new = rows.shape[1] - prompts.shape[1]
        with torch.autocast(rows.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.student.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                        temperature=self.config.sample_temperature, top_k=0, top_p=1.0,
                                        max_new_tokens=new, min_new_tokens=new, pad_token_id=self.pad_token_id)
        return out[:, :rows.shape[1]]


# ---------------------------------------------------------------------------------------------- sequence-level KD


def teacher_continuations(teacher_dir: Path, prompts: torch.Tensor, new_tokens: int, config: LMDistillConfig,
                          path: Path, *, batch_size: int = 16) -> list[str]:
    """The teacher's continuations of `prompts` (teacher ids), made by our engine, batched: each text is
    a prompt and its next `new_tokens` tokens (sampled at `sample_temperature`, no early stop).

    Kept at `path` as a JSONL cache in the teacher's answers' format (`distill.answers.read_jsonl_cache`:
    a header with the teacher's fingerprint and every setting, then one record per prompt appended as it
    is made), so a killed run resumes where it stopped and other settings start afresh.
    """
    import hashlib

    from smallmighty.distill.answers import generate_in_batches, read_jsonl_cache, teacher_fingerprint
    from smallmighty.engine.generate import Engine
    from smallmighty.engine.sampling import GenerationSettings

    header = {"teacher": str(teacher_dir), "fingerprint": teacher_fingerprint(teacher_dir), "backend": "engine",
              "settings": {"method": "sequence", "new_tokens": new_tokens, "temperature": config.sample_temperature,
                           "precision": config.teacher_precision, "seed": config.train.seed,
                           "prompts": hashlib.sha256(prompts.numpy().tobytes()).hexdigest()}}
    texts = {r["index"]: r["text"] for r in read_jsonl_cache(path, header, lambda r: {"index": r["index"],
                                                                                    "text": r["text"]})}
    missing = [i for i in range(len(prompts)) if i not in texts]
    if missing:
        engine = Engine.from_pretrained(teacher_dir, precision=config.teacher_precision)
        engine.eos_token_ids = set()  # continue every prompt for exactly `new_tokens` tokens
        sampling = GenerationSettings(max_new_tokens=new_tokens, temperature=config.sample_temperature,
                                      seed=config.train.seed)
        ids = [prompts[i].tolist() for i in missing]
        with open(path, "a", encoding="utf-8") as out:
            for j, new in generate_in_batches(engine, ids, sampling, batch_size, "teacher continuations"):
                texts[missing[j]] = engine.tokenizer.decode(ids[j] + new, skip_special_tokens=False)
                out.write(json.dumps({"index": missing[j], "text": texts[missing[j]]}, ensure_ascii=False) + "\n")
                out.flush()
    return [texts[i] for i in range(len(prompts))]


def _sequence_rows(teacher_dir: Path, corpus: PackedCorpus, student_tok, config: LMDistillConfig,
                   work: Path) -> torch.Tensor:
    """Student training rows made of the teacher's continuations of corpus prompts."""
    count = config.sequences or len(corpus.train)
    prompts = corpus.train[torch.arange(count) % len(corpus.train), :config.prompt_tokens]
    generated, texts = work / "teacher_continuations.jsonl", work / "sequence_corpus.jsonl"
    if is_main_process():
        continuations = teacher_continuations(teacher_dir, prompts, config.seq_len - config.prompt_tokens, config,
                                              generated)
        # One document per continuation (EOS between them when packed).
        write_text(texts, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in continuations))
    wait_for_everyone()
    ids = tokenize_corpus(texts, student_tok, progress=is_main_process())
    if len(ids) < config.seq_len:
        raise SlmError("the teacher's continuations are shorter than one training sequence")
    return pack(ids, config.seq_len)


# ---------------------------------------------------------------------------------------------- the run


def distill_causal_lm(teacher: str | None, data: str, out_dir: str | Path, config: LMDistillConfig, *,
                      resume: bool = False, scratch_dir: str | Path | None = None,
                      scratch_train: TrainConfig | None = None) -> dict:
    """Distil `teacher` (None: SmolLM2-135M-Instruct) into a student saved at `out_dir`; returns facts
    about the run (shape, parameters, tokens, validation history, wall-clock of each stage).

    With `scratch_dir`, the same student shape is also trained from random weights by plain next-token
    prediction on the same training rows for as many steps (`scratch_train`: its optimiser settings,
    default the student's) and saved there: the baseline that shows what the teacher adds.
    """
    config.validate()
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    out_dir = Path(out_dir)
    teacher_dir = resolve_causal_lm(teacher)
    teacher_model, teacher_tok = load_hf_causal_lm(teacher_dir)
    corpus = load_corpus(data, teacher_tok, config.seq_len, text_field=config.text_field,
                         val_fraction=config.val_fraction, val_source=config.val_data, progress=is_main_process())
    torch.manual_seed(config.train.seed)  # a random student is the same on every run and rank
    student, student_tok, vocab, columns, info = build_lm_student(teacher_model, teacher_tok, str(teacher_dir),
                                                                  corpus.train, config)
    data_rows = _student_rows(corpus, teacher_tok, student_tok, data, config, vocab)
    info["teacher_params"] = count_parameters(teacher_model)
    timings["prepare_s"], clock = time.perf_counter() - clock, time.perf_counter()
    work = checkpoint_dir_for(out_dir)
    work.mkdir(parents=True, exist_ok=True)
    pad = student_tok.pad_token_id if student_tok.pad_token_id is not None else student_tok.eos_token_id
    if config.method == "sequence":
        del teacher_model
        rows = _sequence_rows(teacher_dir, corpus, student_tok, config, work)
        objective: nn.Module = CausalLMObjective(student, precision=config.precision)
        examples, collate = [{"input_ids": row} for row in rows], CausalLMCollator(pad)
        timings["teacher_continuations_s"] = time.perf_counter() - clock
    else:
        rows = data_rows.train
        objective = _token_level_objective(student, teacher_model, teacher_dir, corpus.train, columns, config, pad,
                                           info.get("blocks"))
        del teacher_model  # the kd objective holds a cache; gkd's scorer keeps its own reference
        examples, collate = [{"input_ids": row, "index": i} for i, row in enumerate(rows)], IndexedCollator(pad)
        if config.method == "kd":
            timings["teacher_cache_s"] = time.perf_counter() - clock
    validation = data_rows.validation[: config.max_val_rows or None]
    evaluate_ppl = perplexity_evaluator(validation, CausalLMCollator(pad), config.train.batch_size)
    scored = CausalLMObjective(student, precision=config.precision, attention=None)  # the student as it trains
    clock = time.perf_counter()
    result = train(objective, examples, collate, config.train, checkpoint_dir=work / "train",
                   resume=resume and (work / "train").exists(), desc=f"distill ({config.method})",
                   evaluate=lambda _: evaluate_ppl(scored),
                   select="val_loss", higher_is_better=False, tokens_per_example=config.seq_len)
    timings["distill_train_s"] = time.perf_counter() - clock
    info.update(_run_facts(result, rows, config, student, len(data_rows.validation)), teacher=str(teacher_dir))
    if is_main_process():
        meta = {"recipe": "distill", "teacher": str(teacher_dir), "data": str(data), **info, "config": asdict(config)}
        if vocab is not None:
            meta["teacher_token_ids"] = vocab.teacher_ids
        _set_generation_config(student)
        save_decoder(student, student_tok, out_dir, meta=meta)
    if scratch_dir is not None:
        clock = time.perf_counter()
        info["scratch"] = _train_scratch(student.config, student_tok, data_rows, config, scratch_train or config.train,
                                         info["steps"], Path(scratch_dir), work, resume, pad)
        timings["scratch_train_s"] = time.perf_counter() - clock
    info["timings_s"] = timings
    if is_main_process():
        shutil.rmtree(work, ignore_errors=True)
    return info


def _token_level_objective(student: nn.Module, teacher: nn.Module, teacher_dir: Path, teacher_rows: torch.Tensor,
                           columns: torch.Tensor | None, config: LMDistillConfig, pad: int,
                           blocks: list[int] | None = None) -> LMDistillObjective:
    """"kd": the teacher's outputs cached once, then the teacher is no longer needed; "gkd": a live scorer.

    `blocks`: the teacher blocks a cut student was copied from; the "uniform" layer map then pairs each
    student layer with its block's output (where the copy starts out close), not an even spread."""
    if columns is None:  # unreachable: build_lm_student refuses such students for token-level methods
        raise SlmError("token-level distillation needs a shared vocabulary")
    w = config.weights
    bf16 = resolve_precision(config.precision) == "bf16"
    layer_map = []
    if w.hidden:
        layer_map = ([(s + 1, b + 1) for s, b in enumerate(blocks)] if blocks and config.layer_map.strip().lower() == "uniform"
                     else parse_layer_map(config.layer_map, student.config.num_hidden_layers,
                                          teacher.config.num_hidden_layers))
    if config.method == "gkd":
        if w.hidden:
            raise SlmError("hidden-state matching needs the cached teacher (--method kd)")
        return LMDistillObjective(student, config, scorer=TeacherScorer(teacher, columns, w.temperature, config.top_k,
                                                                        bf16), pad_token_id=pad)
    spec = CacheSpec(top_k=config.top_k, hidden_layers=sorted({t for _, t in layer_map}), temperature=w.temperature,
                     vocabulary=_columns_key(columns))
    # Keyed by the teacher's content, not its path: the cache outlives this run.
    teacher_id = content_fingerprint(sorted(Path(teacher_dir).glob("*.safetensors")) + [Path(teacher_dir) / "config.json"])
    if is_main_process():
        build_lm_teacher_cache(teacher, teacher_rows, spec, teacher_id=teacher_id, columns=columns, bf16=bf16)
    wait_for_everyone()
    cache = TeacherCache(lm_cache_path(teacher_id, teacher_rows, spec))
    return LMDistillObjective(student, config, cache=cache, layer_map=layer_map,
                              teacher_hidden=teacher.config.hidden_size, pad_token_id=pad)


def _train_scratch(student_config, tokenizer, data_rows: StudentData, config: LMDistillConfig, train_config: TrainConfig,
                   steps: int, out_dir: Path, work: Path, resume: bool, pad: int) -> dict:
    """The student's shape from random weights, trained on the student's rows for `steps` steps."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(train_config.seed)
    model = AutoModelForCausalLM.from_config(student_config, dtype=torch.float32)
    objective = CausalLMObjective(model, precision=config.precision)
    collate = CausalLMCollator(pad)
    evaluate = perplexity_evaluator(data_rows.validation[: config.max_val_rows or None], collate, train_config.batch_size)
    train_config = replace(train_config, max_steps=steps)
    result = train(objective, [{"input_ids": row} for row in data_rows.train], collate, train_config,
                   checkpoint_dir=work / "scratch", resume=resume and (work / "scratch").exists(),
                   desc="scratch baseline", evaluate=evaluate, select="val_loss", higher_is_better=False,
                   tokens_per_example=config.seq_len)
    facts = _run_facts(result, data_rows.train, config, model, len(data_rows.validation), train_config)
    if is_main_process():
        _set_generation_config(model)
        save_decoder(model, tokenizer, out_dir, meta={"recipe": "scratch baseline", **facts,
                                                       "train": asdict(train_config)})
    return facts


def _columns_key(columns: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(columns.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def _set_generation_config(student: nn.Module) -> None:
    """The student's generation defaults come from its own config (its special ids after trimming)."""
    from transformers import GenerationConfig

    student.generation_config = GenerationConfig.from_model_config(student.config)


def _run_facts(result: TrainResult, rows: torch.Tensor, config: LMDistillConfig, model: nn.Module,
               validation_rows: int, train_config: TrainConfig | None = None) -> dict:
    train_config = train_config or config.train
    steps = result.history[-1]["step"] if result.history else 0
    per_step = train_config.batch_size * train_config.grad_accum * _num_processes()
    return {"method": config.method, "params": count_parameters(model), "vocab_size": model.config.vocab_size,
            "train_rows": len(rows), "steps": steps, "train_tokens": steps * per_step * config.seq_len,
            "tokens_per_step": per_step * config.seq_len, "history": result.history, "best": result.best,
            "validation_rows": validation_rows, "step_ends_s": result.step_ends}


def _num_processes() -> int:
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).num_processes
