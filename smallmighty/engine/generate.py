"""Text generation engine for Llama-family models on a CPU: batched, streaming, fp32/int8/int4.

The engine reads an HF-format model folder with its own model code (`smallmighty.engine.model`),
`tokenizers` and jinja2 only, so starting it does not pay for importing transformers. Quantized
weights are made once and cached in smallmighty's cache (`engine.model.load_model`), so later
starts load the small file directly.

Batches hold prompts of different lengths by left-padding them: every row writes its next token to
the same cache slot, while its rotary positions count from its own first token and attention skips
the padding. Rows finish independently; the batch stops when all are done. Prompts run through
torch; every decoding step after them is `LlamaModel.decode`, one call into the native C step
(`smallmighty.engine.native`) when it could be built.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from smallmighty.engine.model import LlamaConfig, LlamaModel, additive_mask, load_model
from smallmighty.engine.quantize import PRECISIONS, enable_rows_paths
from smallmighty.engine.sampling import GenerationSettings, TokenChooser
from smallmighty.errors import DataError, SlmError


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"not valid JSON ({err.msg})", file=str(path), line=err.lineno) from None
    return data if isinstance(data, dict) else {}


def _token_string(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int)}
    return set()


class IncrementalText:
    """Detokenizes a growing list of ids, never splitting a multi-byte character, and finds stop strings.

    Each new token's text is the difference between decoding the last few ids with and without it:
    decoding ids one at a time would drop the spaces and bytes that depend on their neighbours.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._prefix = 0
        self._read = 0

    def add(self, token: int) -> None:
        self.ids.append(token)
        self._catch_up(final=False)

    def finish(self) -> None:
        """Flush bytes held back waiting for the rest of a character (the output ended mid-way)."""
        self._catch_up(final=True)

    def _catch_up(self, final: bool) -> None:
        if self.stopped:
            return
        decode = self.tokenizer.decode
        done = decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        full = decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(full) <= len(done) or (full.endswith("\ufffd") and not final):
            return
        before = len(self.text)
        self.text += full[len(done):]
        self._prefix, self._read = self._read, len(self.ids)
        if self.stop:
            start = max(0, before - max(map(len, self.stop)) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True

    def shown(self) -> str:
        """Text safe to show now: without a tail that could still grow into a stop string."""
        if self.stopped:
            return self.text
        hold = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(self.text)), hold, -1):
                if self.text.endswith(stop[:k]):
                    hold = k
                    break
        return self.text[: len(self.text) - hold]


@dataclass
class GenerationStats:
    """What one `Engine.stream` call did, filled in as it runs (for speed reports and for saying
    why a reply ended).

    Times cover the engine's own work only, not what the caller does between pieces of text, and
    the first new token is counted with the prompt: it comes out of the prompt's pass.
    """

    prompt_tokens: int = 0
    #: Tokens the model produced, an end-of-sequence token included.
    new_tokens: int = 0
    #: The prompt's pass and the choice of the first new token.
    prefill_seconds: float = 0.0
    #: Every later token's decode step.
    decode_seconds: float = 0.0
    #: "stop" (end-of-sequence token or stop string) or "length" (max_new_tokens or the context ran out).
    finish_reason: str = ""

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of decode steps (prompt time excluded); 0 with fewer than 2 tokens."""
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


class Engine:
    """Loads a model folder once and generates text from it; see the module docstring."""

    def __init__(self, model: LlamaModel, tokenizer: Any, *, precision: str, max_seq_len: int,
                 eos_token_ids: set[int], bos_token: str | None, eos_token: str | None,
                 chat_template: str | None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.precision = precision
        self.max_seq_len = max_seq_len
        self.eos_token_ids = eos_token_ids
        self.bos_token, self.eos_token = bos_token, eos_token
        self.chat_template = chat_template
        self._template: Any = None

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, *, precision: str = "fp32",
                        max_seq_len: int | None = None, native: bool = True) -> "Engine":
        """Load an HF-format folder (config.json, safetensors weights, tokenizer.json).

        `native=False` keeps decoding in torch operators (as without a C compiler): for comparison.
        """
        from tokenizers import Tokenizer

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise SlmError(f"{model_dir}: model folder not found")
        if precision not in PRECISIONS:
            raise SlmError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        config = LlamaConfig.from_file(model_dir / "config.json")
        limit = config.context_limit
        if max_seq_len is None:
            max_seq_len = limit
        elif not isinstance(max_seq_len, int) or not 2 <= max_seq_len <= limit:
            raise SlmError(f"max_seq_len must be an integer in [2, {limit}] for this model, "
                           f"got {max_seq_len!r}")
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise SlmError(f"{tokenizer_file}: missing; the engine needs a tokenizers JSON file")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # the Rust library raises plain Exceptions for any bad file
            raise SlmError(f"{tokenizer_file}: not a valid tokenizers file ({str(err).splitlines()[0]})") from None
        tok_config = _read_json(model_dir / "tokenizer_config.json")
        template = tok_config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        template_file = model_dir / "chat_template.jinja"
        if template is None and template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        bos, eos = _token_string(tok_config.get("bos_token")), _token_string(tok_config.get("eos_token"))
        eos_ids = (_ids(_read_json(model_dir / "generation_config.json").get("eos_token_id"))
                   | _ids(_read_json(model_dir / "config.json").get("eos_token_id")))
        if eos is not None and tokenizer.token_to_id(eos) is not None:
            eos_ids.add(tokenizer.token_to_id(eos))
        model = load_model(model_dir, config, precision, native)
        return cls(model, tokenizer, precision=precision, max_seq_len=max_seq_len,
                   eos_token_ids=eos_ids, bos_token=bos, eos_token=eos,
                   chat_template=template if isinstance(template, str) else None)

    @classmethod
    def load(cls, name_or_path: str | None = None, *, precision: str = "fp32",
             max_seq_len: int | None = None) -> "Engine":
        """Resolve a model name, GGUF or folder (None = the default model) and load it."""
        from smallmighty.models.causal_lm import resolve_causal_lm

        return cls.from_pretrained(resolve_causal_lm(name_or_path), precision=precision,
                                   max_seq_len=max_seq_len)

    # ---- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids for `text`, with the tokenizer's special tokens unless the text already starts
        with the BOS token (as chat-template output does), so it is never doubled."""
        add_special = not (self.bos_token and text.startswith(self.bos_token))
        return self.tokenizer.encode(text, add_special_tokens=add_special).ids

    def decode(self, ids: list[int]) -> str:
        """Text for `ids`, leaving out special tokens such as end-of-sequence."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """Render chat `messages` ([{"role": ..., "content": ...}]) with the model's jinja template."""
        if self.chat_template is None:
            raise SlmError("this model has no chat template (tokenizer_config.json 'chat_template')")
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            raise SlmError("messages must be a list of {'role': str, 'content': str} objects")
        if self._template is None:
            self._template = self._compile_template(self.chat_template)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except SlmError:
            raise
        except Exception as err:  # the template is the model's code: it can raise anything
            raise SlmError(f"the model's chat template failed to render: {type(err).__name__}: {err}") from None

    @staticmethod
    def _compile_template(source: str) -> Any:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise SlmError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False,
                                                                      indent=indent)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(source)
        except jinja2.TemplateSyntaxError as err:
            raise SlmError(f"chat template, line {err.lineno}: {err.message}") from None

    # ---- generation ---------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], settings: GenerationSettings) -> list[list[int]]:
        """New token ids for each prompt (a batch of any lengths), in prompt order.

        A row ends with the end-of-sequence id when one was generated; with stop strings it ends
        with the token that completed one.
        """
        return [text.ids for text in self._generate_rows(prompts, settings, track_text=False)]

    def generate_text(self, prompts: str | list[str], settings: GenerationSettings) -> str | list[str]:
        """Generated text for one prompt string or a list of them (stop strings cut off)."""
        single = isinstance(prompts, str)
        texts = [prompts] if single else prompts
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise SlmError("prompts must be a string or a list of strings")
        rows = self._generate_rows([self.encode(t) for t in texts], settings, track_text=True)
        out = [row.text for row in rows]
        return out[0] if single else out

    def stream(self, prompt: str, settings: GenerationSettings,
               stats: GenerationStats | None = None) -> Iterator[str]:
        """Yield the generated text in pieces as tokens decode; the pieces join to `generate_text`.

        `stats`, when given, is filled in as generation runs (token counts, times, finish reason).
        """
        settings.validate()
        ids = self.encode(prompt)
        self._check_prompts([ids])
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens, stats.finish_reason = len(ids), "length"
        text = IncrementalText(self.tokenizer, settings.stop)
        shown = 0
        for (token,) in self._steps([ids], settings, stats):
            if token in self.eos_token_ids:
                stats.finish_reason = "stop"
                break
            text.add(token)
            now = text.shown()
            if len(now) > shown:
                yield now[shown:]
                shown = len(now)
            if text.stopped:
                stats.finish_reason = "stop"
                return
        text.finish()
        if len(text.text) > shown:
            yield text.text[shown:]

    def _generate_rows(self, prompts: list[list[int]], settings: GenerationSettings,
                       track_text: bool) -> list[IncrementalText]:
        settings.validate()
        self._check_prompts(prompts)
        track_text = track_text or bool(settings.stop)
        rows = [IncrementalText(self.tokenizer, settings.stop) for _ in prompts]
        done = [False] * len(prompts)
        for tokens in self._steps(prompts, settings):
            for i, token in enumerate(tokens):
                if done[i]:
                    continue
                if token in self.eos_token_ids:
                    rows[i].ids.append(token)
                    done[i] = True
                elif track_text:
                    rows[i].add(token)
                    done[i] = rows[i].stopped
                else:
                    rows[i].ids.append(token)
            if all(done):
                break
        if track_text:
            for row in rows:
                row.finish()
        return rows

    def _check_prompts(self, prompts: list[list[int]]) -> None:
        if not isinstance(prompts, list) or not prompts:
            raise SlmError("prompts must be a non-empty list of token-id lists")
        vocab = self.model.config.vocab_size
        for i, ids in enumerate(prompts):
            if not isinstance(ids, list) or not ids:
                raise SlmError(f"prompt {i} is empty; give at least one token")
            if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
                raise SlmError(f"prompt {i} has token ids outside [0, {vocab})")
            if len(ids) >= self.max_seq_len:
                raise SlmError(f"prompt {i} has {len(ids)} tokens but the context holds "
                               f"{self.max_seq_len} (prompt plus at least one new token); "
                               "shorten the prompt or raise max_seq_len")

    @torch.inference_mode()
    def _steps(self, prompts: list[list[int]], settings: GenerationSettings,
               stats: GenerationStats | None = None) -> Iterator[list[int]]:
        """Yield each step's chosen token per row; stopping the iteration stops the computation.

        At most `max_new_tokens` steps, fewer when the context would overflow. `stats` gets the
        number of steps and the time spent here (not in the caller between steps).
        """
        clock = time.perf_counter()
        model = self.model
        batch, longest = len(prompts), max(map(len, prompts))
        if batch > 1:
            enable_rows_paths(model.linears())  # quantized layers: a faster kernel for several rows, made once
        new = min(settings.max_new_tokens, self.max_seq_len - longest)
        slots = longest + new - 1  # the last new token is never fed back
        cache = model.new_cache(batch, slots)
        rope = model.rope(slots)
        pads = torch.tensor([longest - len(p) for p in prompts])
        ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
        if bool(pads.any()):
            positions = (torch.arange(longest)[None, :] - pads[:, None]).clamp(min=0)
            visible = torch.arange(longest)[None, :] >= pads[:, None]  # [B, longest]: not padding
            causal = torch.ones(longest, longest, dtype=torch.bool).tril()
            # Padding queries see themselves, so no softmax row is empty (their output is unused).
            allowed = (causal & visible[:, None, :]) | torch.eye(longest, dtype=torch.bool)
            logits = model(ids, cache, 0, rope[positions][:, :, None], additive_mask(allowed)[:, None])
        else:
            logits = model(ids, cache, 0, rope[None, :longest, None])
        chooser = TokenChooser(settings, prompts, model.config.vocab_size)
        for step in range(new):
            chosen = chooser(logits)
            tokens = chosen.tolist()
            if stats is not None:
                seconds = time.perf_counter() - clock
                if step == 0:
                    stats.prefill_seconds += seconds
                else:
                    stats.decode_seconds += seconds
                stats.new_tokens += 1
            yield tokens
            if step == new - 1:
                return
            clock = time.perf_counter()
            at = torch.full((batch,), longest + step)  # every row's slot (left padding aligns them)
            logits = model.decode(chosen, cache, at, pads, rope[at - pads])
