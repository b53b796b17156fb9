"""The continuous-batching scheduler on its own (no HTTP): how prompts are cut into chunks, bursts of
requests prefilled in one pass, prompt prefixes reused, and greedy output that never depends on
what else runs or on what the prefix store holds."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from tiny_llama import write_tiny_llama

from smallmighty.engine.generate import Engine
from smallmighty.engine.sampling import GenerationSettings
from smallmighty.serve.scheduler import (
    Delta,
    Finish,
    PrefixStore,
    Scheduler,
    Sequence,
    chunk_ends,
    header_ends,
    on_own_thread,
    turn_ends,
)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    folder = write_tiny_llama(tmp_path_factory.mktemp("scheduler") / "tiny-llama")
    return Engine.from_pretrained(folder, precision="int8", max_seq_len=256)


def test_prompts_are_cut_after_each_turn_and_every_chunk_size_tokens() -> None:
    eot = {2}
    prompt = [1, 5, 5, 2, 9, 1, 7, 7, 7, 7, 7, 2, 9, 1, 3]
    assert turn_ends(prompt, eot) == [4, 12]
    assert chunk_ends(len(prompt), [4, 12], 3) == [3, 4, 7, 10, 12, 15]
    assert chunk_ends(len(prompt), [], 100) == [15]
    assert turn_ends([1, 2], eot) == []  # an end-of-turn token as the last token ends no chunk


def test_prefix_store_keeps_the_longest_match_within_its_token_budget(engine: Engine) -> None:
    cache = engine.model.new_cache(1, 16)
    store = PrefixStore(max_tokens=10)
    store.add([1, 2, 3, 4], cache, 0)
    store.add([1, 2, 3, 4, 5, 6], cache, 0)
    found = store.longest([1, 2, 3, 4, 5, 6, 7], [4, 6])
    assert found is not None and found[0] == 6 and found[1][0].shape[1] == 6
    assert store.longest([1, 2, 3, 9], [3]) is None
    store.add([7, 7, 7], cache, 0)  # over the budget: the least recently used entry ([1, 2, 3, 4]) goes
    assert store.tokens == 9 and store.longest([1, 2, 3, 4, 8], [4]) is None
    assert store.longest([7, 7, 7, 1], [3])[0] == 3


def _run(scheduler: Scheduler, prompts: list[list[int]], settings: GenerationSettings) -> list[str]:
    """Submit all `prompts` at once and wait for their replies."""
    texts = [""] * len(prompts)
    done = threading.Semaphore(0)

    def collect(i: int):
        def emit(event) -> None:
            if isinstance(event, Delta):
                texts[i] += event.text
            elif isinstance(event, Finish):
                done.release()
            else:
                raise AssertionError(event)
        return emit

    with scheduler._cond:  # (re-entrant) the scheduler thread admits them all in one go
        for i, prompt in enumerate(prompts):
            scheduler.submit(Sequence(prompt, settings, collect(i), ignore_eos=True))
    for _ in prompts:
        assert done.acquire(timeout=60)
    return texts


def test_a_burst_is_prefilled_in_shared_passes_and_replies_match_each_request_alone(engine: Engine) -> None:
    system = [{"role": "system", "content": "You answer questions about the capital of France."}]
    questions = ["Hello there!", "What is the capital of France?", "A small model answers", "Paris?",
                 "The world, one token at a time.", "Hello"]
    prompts = [engine.encode(engine.apply_chat_template(system + [{"role": "user", "content": q}]))
               for q in questions]
    prompts.append(engine.encode("The capital of France is"))  # a raw prompt: no turns, no reuse
    settings = GenerationSettings(max_new_tokens=12)

    cold = Scheduler(engine, max_batch=1, prefix_cache_tokens=0)  # nothing reused, one at a time
    alone = [_run(cold, [p], settings)[0] for p in prompts]
    cold.stop()

    scheduler = Scheduler(engine, max_batch=8, prefill_chunk=32)
    passes: list[int] = []
    prefill = engine.model.prefill

    def counting(chunks, cache):
        passes.append(len({c.row for c in chunks}))
        return prefill(chunks, cache)

    engine.model.prefill = counting
    try:
        first = _run(scheduler, prompts[:1], settings)  # stores the system prompt's keys and values
        burst = _run(scheduler, prompts, settings)
    finally:
        del engine.model.prefill
        scheduler.stop()
    assert first + burst == alone[:1] + alone
    assert max(passes) > 1, "no pass held several requests"
    assert scheduler.prefixes.hits >= len(questions)


def test_prompts_that_arrive_while_others_decode_start_one_budget_per_step(engine: Engine) -> None:
    questions = ["Hello there!", "What is the capital of France?", "Paris?", "The world, one token at a time."]
    prompts = [engine.encode(engine.apply_chat_template([{"role": "user", "content": q}])) for q in questions]
    settings = GenerationSettings(max_new_tokens=8)
    cold = Scheduler(engine, max_batch=1, prefix_cache_tokens=0)
    alone = [_run(cold, [p], settings)[0] for p in prompts]
    cold.stop()

    scheduler = Scheduler(engine, max_batch=8, prefill_budget=1, prefix_cache_tokens=0)
    passes: list[int] = []
    prefill = engine.model.prefill

    def counting(chunks, cache):
        passes.append(len(chunks))
        return prefill(chunks, cache)

    engine.model.prefill = counting
    running = Sequence(prompts[0], GenerationSettings(max_new_tokens=200), lambda event: None, ignore_eos=True)
    try:
        scheduler.submit(running)
        deadline = time.monotonic() + 60
        while running.generated < 2:  # decoding
            assert time.monotonic() < deadline
            time.sleep(0.01)
        burst = _run(scheduler, prompts, settings)
        assert running.generated < 200, "the running request ended before the burst was served"
    finally:
        del engine.model.prefill
        scheduler.stop()
    assert burst == alone
    # The first request's chunks (cut after its turn's end) shared one pass: nothing was decoding.
    # The burst arrived while a reply was being decoded: one chunk per pass (the budget is one
    # token, and a pass holds at least one chunk).
    assert passes[0] == len(running.ends) > 1
    assert passes[1:] == [1] * (len(passes) - 1) and len(passes) - 1 >= 2 * len(prompts)


def test_on_own_thread_returns_the_result_and_raises_the_error() -> None:
    assert on_own_thread(lambda: threading.current_thread().name) == "slm-load"
    with pytest.raises(ValueError, match="bad"):
        on_own_thread(lambda: int("bad"))


def test_the_role_header_after_a_turn_end_is_cut_too(engine: Engine) -> None:
    prompt = engine.encode(engine.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]))
    scheduler = Scheduler(engine, max_batch=1)
    try:
        turns = turn_ends(prompt, engine.eos_token_ids)
        headers = header_ends(prompt, turns, scheduler._special, scheduler._newline)
    finally:
        scheduler.stop()
    # "<|im_end|>" ends the system turn, then the user's; "\n<|im_start|>user\n" is the header after
    # the first; the one after the second ("\n<|im_start|>assistant\n") ends the prompt: no cut.
    assert len(turns) == 2 and len(headers) == 1
    assert engine.tokenizer.decode(prompt[turns[0]:headers[0]], skip_special_tokens=False) == "\n<|im_start|>user\n"
    assert header_ends([5, 2, 9], [2], scheduler._special, scheduler._newline) == []  # the last token ends no chunk
