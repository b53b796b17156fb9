"""Continuous batching: many requests share one model, joining and leaving the running batch between
decode steps.

Why a scheduler: one decode step for 16 sequences costs far less than 16 steps for one (the step
reads every weight once, whoever asks), so requests that arrive at different times should still
decode together, and a request that finishes should make room at once instead of waiting for the
whole batch. One thread owns the model and a key/value cache of `max_batch` rows, each as long as
the context. Every iteration it

1. admits waiting requests into free cache rows and drops cancelled ones (a client that went away
   frees its row before the next step);
2. runs prompt chunks of newly admitted requests, about `prefill_chunk` tokens in all, so a long
   prompt never stalls the sequences already decoding for more than one chunk;
3. runs one decode step (`LlamaModel.decode`) for every sequence that has a token to feed, each at
   its own cache row and position.

A prompt is cut into chunks at fixed offsets (multiples of `prefill_chunk`), never by what else is
running, so a request's arithmetic, and its greedy output, is the same alone or in a busy batch.
The HTTP layer talks to it through `submit` (bounded: `QueueFull` when too many wait) and `cancel`;
results come back through each request's `emit` callback, called on the scheduler thread.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from smallmighty.engine.generate import Engine, _Text
from smallmighty.engine.quantize import enable_rows_paths
from smallmighty.engine.sampling import GenerationSettings, TokenChooser


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
    """The request ended: `reason` is "stop" (end-of-sequence or a stop string) or "length"."""

    reason: str
    prompt_tokens: int
    completion_tokens: int


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
    generated: int = 0
    pending: int | None = None  # chosen token not yet fed to the model
    cancelled: bool = False
    text: _Text | None = None
    chooser: TokenChooser | None = None
    shown: int = 0  # characters of text already emitted
    started: float = 0.0  # when it got a cache row (perf_counter)

    @property
    def position(self) -> int:
        """Cache slot where `pending` is written: after the prompt and the tokens fed before it."""
        return len(self.prompt) + self.generated - 1


class Scheduler:
    """Runs requests through `engine` with continuous batching; see the module docstring."""

    def __init__(self, engine: Engine, *, max_batch: int = 16, max_queue: int = 64,
                 prefill_chunk: int = 256) -> None:
        self.engine = engine
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        model = engine.model
        if max_batch > 1:
            enable_rows_paths(model.linears())
        self.cache = model.new_cache(max_batch, engine.max_seq_len)
        self.rope = model.rope(engine.max_seq_len)
        self.first = torch.zeros(max_batch, dtype=torch.long)  # every row starts at slot 0
        self._free = list(range(max_batch - 1, -1, -1))
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._seconds_per_request = 1.0  # running mean, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="slm-scheduler", daemon=True)
        self._thread.start()

    # ---- called from the HTTP side -----------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        """Queue `seq`; raise `QueueFull` when `max_queue` requests already wait for a row."""
        seq.text = _Text(self.engine.tokenizer, seq.settings.stop)
        seq.chooser = TokenChooser(seq.settings, [seq.prompt], self.engine.model.config.vocab_size)
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

    def _queued(self) -> int:
        return max(0, len(self._waiting) - len(self._free))

    # ---- the scheduler thread ----------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while self._admit():
                prefilling = [s for s in self._running if s.prefilled < len(s.prompt)]
                if prefilling:
                    self._prefill(prefilling)
                decoding = [s for s in self._running if s.pending is not None]
                if decoding:
                    self._decode(decoding)

    def _admit(self) -> bool:
        """Drop cancelled sequences, move waiting ones into free rows; block while idle.

        Returns False once stopped."""
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
                if self._stopping:
                    return False
                if self._running:
                    return True
                self._cond.wait()

    def _release(self, seq: Sequence) -> None:
        self._running.remove(seq)
        self._free.append(seq.row)
        seq.row = -1

    def _prefill(self, sequences: list[Sequence]) -> None:
        """Run prompt chunks, oldest request first, until about `prefill_chunk` tokens ran."""
        budget = self.prefill_chunk
        for seq in sequences:
            while budget > 0 and seq.prefilled < len(seq.prompt):
                start = seq.prefilled
                end = min(len(seq.prompt), (start // self.prefill_chunk + 1) * self.prefill_chunk)
                try:
                    logits = self.engine.model(
                        torch.tensor([seq.prompt[start:end]]), [kv[seq.row:seq.row + 1] for kv in self.cache],
                        start, self.rope[None, start:end, None])
                except Exception as err:  # noqa: BLE001 - the request fails, the server goes on
                    self._fail(seq, err)
                    break
                seq.prefilled, budget = end, budget - (end - start)
                if end == len(seq.prompt):
                    self._accept(seq, int(seq.chooser(logits)[0]))
            if budget <= 0:
                return

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
        seq.emit(Finish(reason, len(seq.prompt), seq.generated))
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
