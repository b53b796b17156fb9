"""`slm serve` end to end: the official OpenAI client against a live server on a tiny random Llama.

Covers the API shapes (chat, completions, streaming and not, models, health, metrics), continuous
batching (the same greedy reply alone and inside a busy batch), sampling settings, stop strings and
end-of-sequence, context limits, the bounded queue (429 + Retry-After), API keys, body limits, bad
input (400 with an OpenAI error object), client disconnects freeing their slot, and SIGTERM draining.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from launch import free_port
from live import LiveServer
from tiny_llama import write_tiny_llama

from smallmighty.serve.server import load_service

REPO = Path(__file__).resolve().parents[2]
HELLO = [{"role": "user", "content": "Hello there! What is the capital of France?"}]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("serve") / "tiny-llama")


@pytest.fixture(scope="module")
def live(tiny_dir: Path):
    server = LiveServer(load_service(str(tiny_dir), precision="int8", max_batch=8, max_queue=8))
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


def chat(client: openai.OpenAI, messages=HELLO, **kwargs) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model="tiny", messages=messages, **kwargs)


def streamed(client: openai.OpenAI, messages=HELLO, **kwargs) -> tuple[str, str, object]:
    """(text, finish_reason, usage) of a streamed chat completion."""
    parts, reason, usage = [], None, None
    for chunk in client.chat.completions.create(model="tiny", messages=messages, stream=True,
                                                stream_options={"include_usage": True}, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            reason = choice.finish_reason or reason
    return "".join(parts), reason, usage


# --- shapes -----------------------------------------------------------------------------------

def test_chat_streamed_and_whole_replies_agree(client: openai.OpenAI) -> None:
    whole = chat(client, max_tokens=24, temperature=0)
    text, reason, usage = streamed(client, max_tokens=24, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert text == whole.choices[0].message.content and text
    assert reason == whole.choices[0].finish_reason == "length"
    assert usage.completion_tokens == whole.usage.completion_tokens == 24
    assert usage.prompt_tokens == whole.usage.prompt_tokens > 10


def test_text_completions_and_models(client: openai.OpenAI, live: LiveServer) -> None:
    done = client.completions.create(model="tiny", prompt="The capital of France", max_tokens=8, temperature=0)
    assert done.object == "text_completion" and done.usage.completion_tokens == 8
    pieces = [c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="The capital of France", max_tokens=8, temperature=0, stream=True)]
    assert "".join(pieces) == done.choices[0].text
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(live.url + "/health").json() == {"status": "ok", "model": "tiny", "kind": "chat"}


def test_chat_template_is_applied_and_no_template_token_leaks(client: openai.OpenAI, live: LiveServer) -> None:
    engine = live.service.engine
    messages = [{"role": "system", "content": "Be brief."}] + HELLO
    expected = engine.encode(engine.apply_chat_template(messages, add_generation_prompt=True))
    reply = chat(client, messages=messages, max_tokens=5, temperature=0)
    assert reply.usage.prompt_tokens == len(expected)
    # Sampled replies of a random model hit special tokens often; none of them may show as text.
    for seed in range(6):
        text = chat(client, max_tokens=60, temperature=1.5, seed=seed, extra_body={"ignore_eos": True})
        content = text.choices[0].message.content
        assert not any(s in content for s in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))


def test_metrics_count_requests_and_tokens(client: openai.OpenAI, live: LiveServer) -> None:
    before = live.metric("slm_completion_tokens_total")
    ok_before = live.metric('slm_requests_total{endpoint="/v1/chat/completions",status="200"}')
    chat(client, max_tokens=7, temperature=0)
    text = httpx.get(live.url + "/metrics").text
    assert live.metric("slm_completion_tokens_total") == before + 7
    assert live.metric('slm_requests_total{endpoint="/v1/chat/completions",status="200"}') == ok_before + 1
    for series in ("slm_time_to_first_token_seconds_bucket", "slm_request_latency_seconds_bucket",
                   "slm_queue_depth", "slm_active_sequences", "slm_prompt_tokens_total"):
        assert series in text


# --- batching and sampling ----------------------------------------------------------------------

def test_greedy_reply_is_the_same_alone_and_in_a_busy_batch(client: openai.OpenAI) -> None:
    alone = chat(client, max_tokens=40, temperature=0, extra_body={"ignore_eos": True}).choices[0].message.content
    results: dict[int, str] = {}

    def other(i: int) -> None:  # different prompts, lengths and settings decoding alongside
        messages = [{"role": "user", "content": "A small model answers " * (i + 1)}]
        results[i] = chat(client, messages=messages, max_tokens=30 + 7 * i, temperature=0.8, seed=i,
                          extra_body={"ignore_eos": True}).choices[0].message.content

    threads = [threading.Thread(target=other, args=(i,)) for i in range(6)]
    for t in threads[:3]:
        t.start()
    time.sleep(0.05)
    busy = chat(client, max_tokens=40, temperature=0, extra_body={"ignore_eos": True}).choices[0].message.content
    for t in threads[3:]:
        t.start()
    for t in threads:
        t.join()
    assert busy == alone
    assert len(results) == 6


def test_a_shared_system_prompt_is_computed_once_then_reported_as_cached(client: openai.OpenAI,
                                                                         live: LiveServer) -> None:
    system = [{"role": "system", "content": "You answer in one word about capitals."}]
    before = live.metric("slm_prompt_tokens_cached_total")
    first = chat(client, messages=system + HELLO, max_tokens=3, temperature=0)
    second = chat(client, messages=system + [{"role": "user", "content": "And of Italy?"}], max_tokens=3,
                  temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens
    assert live.metric("slm_prompt_tokens_cached_total") == before + cached


def test_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return chat(client, max_tokens=30, temperature=1.0, top_p=0.9, seed=seed,
                    extra_body={"ignore_eos": True}).choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1


def test_stop_strings_cut_the_reply(client: openai.OpenAI) -> None:
    full = chat(client, max_tokens=40, temperature=0, extra_body={"ignore_eos": True}).choices[0].message.content
    stop = full[10:13]
    cut = chat(client, max_tokens=40, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    text, reason, _ = streamed(client, max_tokens=40, temperature=0, stop=stop, extra_body={"ignore_eos": True})
    assert (text, reason) == (full[: full.index(stop)], "stop")


def test_end_of_sequence_token_ends_the_reply(tiny_dir: Path, tmp_path: Path) -> None:
    # Make the 6th greedy token the model's end-of-sequence token: the reply must stop before it.
    service = load_service(str(tiny_dir), precision="fp32", max_batch=1)
    engine = service.engine
    prompt = engine.encode(engine.apply_chat_template(HELLO, add_generation_prompt=True))
    from smallmighty.engine.sampling import GenerationSettings

    tokens = engine.generate([prompt], GenerationSettings(max_new_tokens=6))[0]
    service.close()
    assert len(tokens) == 6, "the tiny model ended early; pick another prompt"
    folder = tmp_path / "eos"
    shutil.copytree(tiny_dir, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, tokens[5]]}))
    server = LiveServer(load_service(str(folder), precision="fp32", max_batch=2))
    try:
        reply = chat(openai.OpenAI(base_url=server.url + "/v1", api_key="x"), max_tokens=50, temperature=0)
        assert reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens == 6  # the end token counts, its text does not show
        assert reply.choices[0].message.content == engine.decode(tokens[:5])
    finally:
        server.close()


# --- limits and bad input -------------------------------------------------------------------------

def test_context_length_is_enforced_with_a_clear_400(client: openai.OpenAI) -> None:
    long = [{"role": "user", "content": "capital " * 400}]
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, messages=long, max_tokens=5)
    assert err.value.code == "context_length_exceeded" and "maximum context length is 256" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, max_tokens=250)
    assert err.value.code == "context_length_exceeded" and "lower max_tokens" in err.value.message
    # Without max_tokens the reply may use the rest of the context.
    assert chat(client, temperature=0).usage.total_tokens <= 256


@pytest.mark.parametrize("body, field", [
    ({"messages": []}, "messages"),
    ({"messages": HELLO, "n": 2}, "n"),
    ({"messages": HELLO, "temperature": "hot"}, "temperature"),
    ({"messages": HELLO, "temperature": 3}, "temperature"),
    ({"messages": HELLO, "top_p": 0}, "top_p"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"messages": HELLO, "max_tokens": True}, "max_tokens"),
    ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": HELLO, "seed": -1}, "seed"),
    ({"messages": HELLO, "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"messages": HELLO, "tools": []}, "tools"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": "hi"}, "messages"),
    ([1, 2, 3], None),
])
def test_bad_requests_get_400_with_an_openai_error(live: LiveServer, body, field) -> None:
    answer = httpx.post(live.url + "/v1/chat/completions", json=body)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == field


def test_unparseable_bodies_and_unknown_routes(live: LiveServer) -> None:
    for content in (b"", b"{not json", b"\xff\xfe", b"[" * 100000):
        answer = httpx.post(live.url + "/v1/chat/completions", content=content)
        assert answer.status_code == 400 and "error" in answer.json()
    assert httpx.get(live.url + "/v1/nothing").json()["error"]["type"] == "not_found_error"
    assert httpx.get(live.url + "/v1/chat/completions").status_code == 405


def test_body_size_is_limited(tiny_dir: Path) -> None:
    server = LiveServer(load_service(str(tiny_dir), precision="fp32", max_batch=1), max_body_bytes=2048)
    try:
        big = {"messages": [{"role": "user", "content": "x" * 5000}]}
        answer = httpx.post(server.url + "/v1/chat/completions", json=big)
        assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: the cap holds while the body streams in
            for _ in range(10):
                yield b"x" * 1000

        answer = httpx.post(server.url + "/v1/chat/completions", content=chunks())
        assert answer.status_code == 413
    finally:
        server.close()


def test_api_key_is_required_when_set(tiny_dir: Path) -> None:
    server = LiveServer(load_service(str(tiny_dir), precision="fp32", max_batch=1), api_key="s3cret")
    try:
        for key in ("wrong", ""):
            with pytest.raises(openai.AuthenticationError):
                chat(openai.OpenAI(base_url=server.url + "/v1", api_key=key or "x", max_retries=0), max_tokens=2)
        assert httpx.post(server.url + "/v1/chat/completions", json={"messages": HELLO}).status_code == 401
        assert httpx.get(server.url + "/metrics").status_code == 401
        assert httpx.get(server.url + "/health").status_code == 200
        reply = chat(openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret"), max_tokens=2, temperature=0)
        assert reply.usage.completion_tokens == 2
    finally:
        server.close()


def test_full_queue_answers_429_with_retry_after(tiny_dir: Path) -> None:
    server = LiveServer(slowed(load_service(str(tiny_dir), precision="fp32", max_batch=1, max_queue=1)))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    try:
        # Hold the only row and the only queue place with two streams that are not read yet.
        streams = [httpx.Client(timeout=30).stream(
            "POST", server.url + "/v1/chat/completions",
            json={"messages": HELLO, "max_tokens": 200, "stream": True, "ignore_eos": True}) for _ in range(2)]
        opened = [s.__enter__() for s in streams]
        assert [r.status_code for r in opened] == [200, 200]
        with pytest.raises(openai.RateLimitError) as err:
            chat(client, max_tokens=2)
        assert int(err.value.response.headers["Retry-After"]) >= 1
        assert err.value.code == "server_busy"
        for response, stream in zip(opened, streams):  # both accepted requests complete
            lines = [line for line in response.iter_lines() if line.startswith("data:")]
            assert lines[-1] == "data: [DONE]"
            stream.__exit__(None, None, None)
        assert chat(client, max_tokens=2, temperature=0).usage.completion_tokens == 2
    finally:
        server.close()


# --- disconnects and shutdown ---------------------------------------------------------------------

def test_client_disconnect_frees_its_slot(live: LiveServer) -> None:
    cancelled = live.metric("slm_cancelled_requests_total")
    before = live.metric("slm_completion_tokens_total")
    with httpx.stream("POST", live.url + "/v1/chat/completions", timeout=30,
                      json={"messages": HELLO, "max_tokens": 220, "stream": True, "ignore_eos": True}) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
    # Closed after a few tokens: the sequence leaves the batch, well short of its 220 tokens.
    deadline = time.time() + 5
    while live.metric("slm_cancelled_requests_total") < cancelled + 1 and time.time() < deadline:
        time.sleep(0.02)
    assert live.metric("slm_cancelled_requests_total") == cancelled + 1
    assert live.metric("slm_active_sequences") == 0
    assert live.metric("slm_completion_tokens_total") - before < 220


def test_client_disconnect_frees_a_waiting_non_streamed_request(tiny_dir: Path) -> None:
    server = LiveServer(slowed(load_service(str(tiny_dir), precision="fp32", max_batch=1, max_queue=4)))

    def give_up() -> None:  # a client that stops waiting while its request sits in the queue
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 5},
                       timeout=0.5)

    try:
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30,
                          json={"messages": HELLO, "max_tokens": 200, "stream": True, "ignore_eos": True}) as held:
            lines = held.iter_lines()  # kept: a dropped iterator would close the connection
            next(lines)
            give_up()
            deadline = time.time() + 5
            while server.metric("slm_cancelled_requests_total") < 1 and time.time() < deadline:
                time.sleep(0.05)
            assert server.metric("slm_cancelled_requests_total") == 1
            assert server.metric("slm_queue_depth") == 0
    finally:
        server.close()


def slowed(service, seconds_per_step: float = 0.01):
    """`service` with each decode step taking at least `seconds_per_step`: a stand-in for a big model,
    so a request surely holds its slot while the test acts."""
    model = service.engine.model
    decode = model.decode

    def slow_decode(*args, **kwargs):
        time.sleep(seconds_per_step)
        return decode(*args, **kwargs)

    model.decode = slow_decode
    return service


def test_sigterm_finishes_requests_in_flight_then_exits(tiny_dir: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "smallmighty.cli", "serve", str(tiny_dir), "--port", str(port),
         "--precision", "fp32", "--max-batch", "1", "--drain-seconds", "20"],
        env=os.environ | {"PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert process.poll() is None, process.stderr.read()
                assert time.time() < deadline, "the server did not start"
                time.sleep(0.1)
        body = {"messages": HELLO, "max_tokens": 200, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][5:])["usage"]["completion_tokens"] == 200
        process.wait(30)
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health")
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
