"""Continuous batching: many requests share one model, joining and leaving the running batch between
decode steps.

Why a scheduler: one decode step for 16 sequences costs far less than 16 steps for one (the step
reads every weight once, whoever asks), so requests that arrive at different times should still
decode together, and a request that finishes should make room at once instead of waiting for the
whole batch. One thread owns the model and a key/value cache of `max_batch` rows, each as long as
the context. Every iteration it

1. admits waiting requests into free cache rows and drops cancelled ones (a client that went away
   frees its row before the next step); a request whose prompt starts with a prefix kept in the
   prefix store (a system prompt and the next turn's role header, a conversation's earlier turns)
   gets its keys and values copied in and skips those tokens;
2. runs prompt chunks of the admitted requests as one pass (`LlamaModel.prefill`), so new requests
   share one read of the weights: about `prefill_chunk` tokens when nothing is decoding, else
   about `prefill_budget` (at least one chunk), so a long prompt or a burst of new ones never
   stalls the running replies for long, and a burst that arrives while others decode starts over
   several steps, its requests getting their first tokens one pass after another instead of all
   after one long pass (and then finishing at different steps, so their clients' next requests
   do not come back as one burst either);
3. runs one decode step (`LlamaModel.decode`) for every sequence that has a token to feed, each at
   its own cache row and position.

A request's greedy output is the same alone or in a busy batch: its prompt is cut into chunks by
its own tokens only (after every end-of-turn token and the role header that follows it, and every
`prefill_chunk` tokens between), each
chunk is computed the same way whatever else shares its pass (see `LlamaModel.prefill`), and the
prefix store keeps exactly the keys and values those chunks produced.
The HTTP layer talks to it through `submit` (bounded: `QueueFull` when too many wait) and `cancel`;
results come back through each request's `emit` callback, called on the scheduler thread.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from smallmighty.engine.generate import Engine, IncrementalText
from smallmighty.engine.model import PromptChunk
from smallmighty.engine.quantize import enable_rows_paths
from smallmighty.engine.sampling import GenerationSettings, TokenChooser

T = TypeVar("T")


def on_own_thread(work: Callable[[], T]) -> T:
    """`work()` run on a thread of its own that ends when it returns (its exception raised here).

    Why: libgomp, the OpenMP runtime of torch and of the native decode step, gives every thread
    that starts a parallel region a pool of worker threads, kept until that thread ends; once the
    process holds more such threads than it has CPUs, every pool stops spinning at barriers and
    sleeps in the kernel instead, and the native step crosses some 250 barriers per token. Loading
    a model on the main thread (its pool stays) before the scheduler thread starts its own made a
    batch-1 decode step 13 ms instead of 4.4 on a 2-core AMD EPYC. So `load_service` loads on a
    thread that ends, and the scheduler thread does all of its model work itself.
    """
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as err:  # noqa: BLE001 - raised again on the caller's thread
            failure.append(err)

    thread = threading.Thread(target=run, name="slm-load")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result[0]


class QueueFull(Exception):
    """Every cache row is busy and `max_queue` requests already wait; `retry_after` is a guess in seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the server is at capacity; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Delta:
    """New reply text (may be empty when a token added no visible character yet)."""

    text: str


@dataclass
class Finish:
    """The request ended: `reason` is "stop" (end-of-sequence or a stop string) or "length";
    `cached_tokens` of the prompt came from the prefix store instead of being computed."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass
class Failure:
    """The model failed on this request (not the client's fault)."""

    message: str


Event = Delta | Finish | Failure


@dataclass(eq=False)
class Sequence:
    """One request's life in the scheduler: its prompt, settings, cache row and output so far."""

    prompt: list[int]
    settings: GenerationSettings
    emit: Callable[[Event], None]
    ignore_eos: bool = False
    id: int = field(default_factory=itertools.count().__next__)
    row: int = -1
    prefilled: int = 0  # prompt tokens already in the cache
    cached: int = 0  # of which copied from the prefix store
    ends: list[int] = field(default_factory=list)  # where the prompt's chunks end (`chunk_ends`)
    turns: list[int] = field(default_factory=list)  # ends after an end-of-turn token or the next role header
    generated: int = 0
    pending: int | None = None  # chosen token not yet fed to the model
    cancelled: bool = False
    text: IncrementalText | None = None
    chooser: TokenChooser | None = None
    shown: int = 0  # characters of text already emitted
    started: float = 0.0  # when it got a cache row (perf_counter)

    @property
    def position(self) -> int:
        """Cache slot where `pending` is written: after the prompt and the tokens fed before it."""
        return len(self.prompt) + self.generated - 1


def turn_ends(prompt: list[int], end_of_turn: set[int]) -> list[int]:
    """Prompt positions just after an end-of-turn token (the model's end-of-sequence ids), before
    the last token: where a system prompt or an earlier turn of a conversation ends."""
    return [i + 1 for i, token in enumerate(prompt[:-1]) if token in end_of_turn]


#: How far after a turn end the next turn's role header is looked for.
HEADER_SCAN = 8


def header_ends(prompt: list[int], turns: list[int], special: Callable[[int], bool],
                newline: Callable[[int], bool]) -> list[int]:
    """Prompt positions just after the role header that follows each turn end, before the last
    token: after the first token holding a newline that comes after a special token, within
    `HEADER_SCAN` tokens (ChatML's "\\n<|im_start|>user\\n", Llama 3's
    "<|start_header_id|>user<|end_header_id|>\\n\\n", Gemma's "\\n<start_of_turn>user\\n").

    Why: every request of a chat starts its own turn with the same header after the shared system
    prompt; ending a chunk there lets the prefix store keep it too."""
    ends = []
    for turn in turns:
        seen_special = False
        for i in range(turn, min(turn + HEADER_SCAN, len(prompt) - 1)):
            if seen_special and newline(prompt[i]):
                ends.append(i + 1)
                break
            seen_special = seen_special or special(prompt[i])
    return ends


def chunk_ends(length: int, turns: list[int], size: int) -> list[int]:
    """Where the chunks of a prompt of `length` tokens end: at every turn end, and every `size`
    tokens after the previous end; the last is `length`."""
    ends, start = [], 0
    for cut in [*turns, length]:
        ends.extend(range(start + size, cut, size))
        ends.append(cut)
        start = cut
    return ends


class PrefixStore:
    """Keys and values of prompt prefixes that end at a turn end, for later requests that start
    with the same tokens (the same system prompt, the earlier turns of the same conversation).

    Least recently used entries go first once they hold more than `max_tokens` positions (each
    costs one position of every layer's cache: 46 KB for SmolLM2-135M).
    """

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.tokens = 0
        self.hits = 0
        self._entries: OrderedDict[tuple[int, ...], list[torch.Tensor]] = OrderedDict()

    def longest(self, prompt: list[int], turns: list[int]) -> tuple[int, list[torch.Tensor]] | None:
        """(length, per-layer keys and values) of the longest stored prefix of `prompt` ending at
        one of its `turns`, or None."""
        for end in reversed(turns):
            key = tuple(prompt[:end])
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return end, self._entries[key]
        return None

    def add(self, prefix: list[int], cache: list[torch.Tensor], row: int) -> None:
        """Keep a copy of cache row `row`'s slots [0, len(prefix)), which hold `prefix`."""
        key, end = tuple(prefix), len(prefix)
        if key in self._entries or end > self.max_tokens:
            return
        self._entries[key] = [kv[row, :, :end].clone() for kv in cache]
        self.tokens += end
        while self.tokens > self.max_tokens:
            old, _ = self._entries.popitem(last=False)
            self.tokens -= len(old)


class Scheduler:
    """Runs requests through `engine` with continuous batching; see the module docstring."""

    def __init__(self, engine: Engine, *, max_batch: int = 16, max_queue: int = 64,
                 prefill_chunk: int = 256, prefill_budget: int = 32, prefix_cache_tokens: int = 2048) -> None:
        self.engine = engine
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.prefill_budget = prefill_budget
        self.prefixes = PrefixStore(prefix_cache_tokens)
        added = getattr(engine.tokenizer, "get_added_tokens_decoder", dict)()
        self._specials = {i for i, token in added.items() if getattr(token, "special", False)}
        self._newlines: dict[int, bool] = {}
        self.cache: list[torch.Tensor] = []
        self.rope = torch.empty(0)  # both made by the scheduler thread (`_set_up`)
        self.first = torch.zeros(max_batch, dtype=torch.long)  # every row starts at slot 0
        self._free = list(range(max_batch - 1, -1, -1))
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._seconds_per_request = 1.0  # running mean, for Retry-After
        self._ready = threading.Event()
        self._setup_error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="slm-scheduler", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._setup_error is not None:
            raise self._setup_error

    # ---- called from the HTTP side -----------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        """Queue `seq`; raise `QueueFull` when `max_queue` requests already wait for a row."""
        seq.text = IncrementalText(self.engine.tokenizer, seq.settings.stop)
        turns = turn_ends(seq.prompt, self.engine.eos_token_ids)
        seq.turns = sorted({*turns, *header_ends(seq.prompt, turns, self._special, self._newline)})
        seq.ends = chunk_ends(len(seq.prompt), seq.turns, self.prefill_chunk)
        with self._cond:
            if self._stopping:
                raise QueueFull(retry_after=5)
            if self._queued() >= self.max_queue:
                waves = (self._queued() + len(self._running)) / self.max_batch
                raise QueueFull(retry_after=max(1, min(60, round(waves * self._seconds_per_request))))
            self._waiting.append(seq)
            self._cond.notify()

    def cancel(self, seq: Sequence) -> None:
        """Stop `seq` (its client went away): out of the queue now, or its row freed before the next step."""
        seq.cancelled = True
        with self._cond:
            if seq.row < 0 and seq in self._waiting:
                self._waiting.remove(seq)
            self._cond.notify()

    def queue_depth(self) -> int:
        """Requests waiting for a cache row."""
        with self._cond:
            return self._queued()

    def active(self) -> int:
        """Sequences holding a cache row (being prefilled or decoded)."""
        return len(self._running)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread after the current step; waiting and running requests are dropped."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    def _special(self, token: int) -> bool:
        return token in self._specials

    def _newline(self, token: int) -> bool:
        if token not in self._newlines:
            self._newlines[token] = "\n" in self.engine.tokenizer.decode([token], skip_special_tokens=False)
        return self._newlines[token]

    def _queued(self) -> int:
        return max(0, len(self._waiting) - len(self._free))

    # ---- the scheduler thread ----------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._set_up()
        except BaseException as err:  # noqa: BLE001 - raised again by __init__
            self._setup_error = err
            return
        finally:
            self._ready.set()
        with torch.inference_mode():
            while (admitted := self._admit()) is not None:
                for seq in admitted:
                    # (here, not in `submit`: its tensors are torch work, which stays on this thread)
                    seq.chooser = TokenChooser(seq.settings, [seq.prompt], self.engine.model.config.vocab_size)
                    self._reuse_prefix(seq)
                prefilling = [s for s in self._running if s.prefilled < len(s.prompt)]
                if prefilling:
                    replying = any(s.pending is not None for s in self._running)
                    self._prefill(prefilling, self.prefill_budget if replying else self.prefill_chunk)
                decoding = [s for s in self._running if s.pending is not None]
                if decoding:
                    self._decode(decoding)

    def _set_up(self) -> None:
        """The model work done once, here on the scheduler thread, like every later step: torch
        starts parallel regions even for the rotation table, and each thread that does keeps a
        pool of OpenMP workers (see `on_own_thread`)."""
        model, length = self.engine.model, self.engine.max_seq_len
        # Prompt passes mix requests (and skip stored prefixes), so they need the layers' kernel
        # whose rows do not depend on each other (see `LlamaModel.prefill`), even for one row.
        enable_rows_paths(model.linears())
        self.cache = model.new_cache(self.max_batch, length)
        self.rope = model.rope(length)

    def _admit(self) -> list[Sequence] | None:
        """Drop cancelled sequences, move waiting ones into free rows; block while idle.

        Returns the sequences given a row now, or None once stopped."""
        admitted = []
        with self._cond:
            while True:
                for seq in [s for s in self._running if s.cancelled]:
                    self._release(seq)
                while self._waiting and self._free:
                    seq = self._waiting.popleft()
                    if not seq.cancelled:
                        seq.row = self._free.pop()
                        seq.started = time.perf_counter()
                        self._running.append(seq)
                        admitted.append(seq)
                if self._stopping:
                    return None
                if self._running:
                    return admitted
                self._cond.wait()

    def _release(self, seq: Sequence) -> None:
        self._running.remove(seq)
        self._free.append(seq.row)
        seq.row = -1

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Copy the keys and values of the longest stored prefix of `seq`'s prompt into its row."""
        found = self.prefixes.longest(seq.prompt, seq.turns)
        if found is not None:
            end, stored = found
            for kv, part in zip(self.cache, stored):
                kv[seq.row, :, :end] = part
            seq.prefilled = seq.cached = end

    def _prefill(self, sequences: list[Sequence], budget: int) -> None:
        """One pass over the next prompt chunks, oldest request first: about `budget` tokens, at
        least one chunk."""
        chunks: list[tuple[Sequence, int, int]] = []  # (sequence, start, end)
        for seq in sequences:
            start = seq.prefilled
            for end in (e for e in seq.ends if e > seq.prefilled):
                if end - start > budget and chunks:
                    break
                chunks.append((seq, start, end))
                budget, start = budget - (end - start), end
            if budget <= 0:
                break
        try:
            logits = self.engine.model.prefill(
                [PromptChunk(seq.prompt[start:end], seq.row, start) for seq, start, end in chunks], self.cache)
        except Exception as err:  # noqa: BLE001 - the requests fail, the server goes on
            for seq in {seq: None for seq, _, _ in chunks}:
                self._fail(seq, err)
            return
        for i, (seq, start, end) in enumerate(chunks):
            seq.prefilled = end
            if end in seq.turns:
                self.prefixes.add(seq.prompt[:end], self.cache, seq.row)
            if end == len(seq.prompt):
                self._accept(seq, int(seq.chooser(logits[i:i + 1])[0]))

    def _decode(self, sequences: list[Sequence]) -> None:
        """One token for every sequence in `sequences`, each at its own row and position."""
        slots = torch.tensor([s.position for s in sequences])
        rows = torch.tensor([s.row for s in sequences])
        try:
            logits = self.engine.model.decode(torch.tensor([s.pending for s in sequences]), self.cache,
                                              slots, self.first[rows], self.rope[slots], rows)
        except Exception as err:  # noqa: BLE001
            for seq in sequences:
                self._fail(seq, err)
            return
        greedy = logits.argmax(dim=-1).tolist()  # one call for every greedy row of the batch
        for i, seq in enumerate(sequences):
            s = seq.settings
            plain = s.temperature == 0 and s.repetition_penalty == 1.0
            self._accept(seq, greedy[i] if plain else int(seq.chooser(logits[i:i + 1])[0]))

    def _accept(self, seq: Sequence, token: int) -> None:
        """Take `seq`'s next token, emit its text, and finish when due."""
        seq.generated += 1
        seq.pending = None
        text = seq.text
        if token in self.engine.eos_token_ids and not seq.ignore_eos:
            return self._finish(seq, "stop")
        text.add(token)
        if text.stopped:
            return self._finish(seq, "stop")
        room = self.engine.max_seq_len - len(seq.prompt)
        if seq.generated >= min(seq.settings.max_new_tokens, room):
            return self._finish(seq, "length")
        shown = text.shown()
        if len(shown) > seq.shown:
            seq.emit(Delta(shown[seq.shown:]))
            seq.shown = len(shown)
        seq.pending = token

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.text.finish()
        if len(seq.text.text) > seq.shown:
            seq.emit(Delta(seq.text.text[seq.shown:]))
            seq.shown = len(seq.text.text)
        seq.emit(Finish(reason, len(seq.prompt), seq.generated, seq.cached))
        self._done(seq)

    def _fail(self, seq: Sequence, err: Exception) -> None:
        seq.emit(Failure(f"generation failed: {type(err).__name__}: {err}"))
        self._done(seq)

    def _done(self, seq: Sequence) -> None:
        elapsed = time.perf_counter() - seq.started
        self._seconds_per_request += 0.1 * (elapsed - self._seconds_per_request)
        with self._cond:
            if seq in self._running:
                self._release(seq)
