"""Hypothesis throws 600 malformed and odd requests at a live server: none may get a 5xx, and the
server must keep answering. Bodies are mutations of valid chat/completion/classify requests (any
JSON value in any field, missing and unknown fields), arbitrary JSON, and raw bytes, sent to every
route and some that do not exist, with odd methods, content types and credentials.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live import LiveServer
from tiny_llama import write_tiny_llama

from smallmighty.serve.server import ENDPOINTS, load_service

EXAMPLES = 600

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
message = st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "system", "assistant", "tool", 3]) | json_values,
                                              "content": st.text(max_size=60) | json_values,
                                              "name": json_values})
FIELDS = {
    "model": json_values, "messages": st.lists(message, max_size=3) | json_values,
    "prompt": st.text(max_size=60) | st.lists(st.text(max_size=20), max_size=2) | json_values,
    "input": st.text(max_size=30) | json_values,
    "max_tokens": st.integers(-5, 80) | json_values, "temperature": st.floats(-1, 3) | json_values,
    "top_p": st.floats(-0.5, 1.5) | json_values, "n": st.integers(0, 3) | json_values,
    "stream": st.booleans() | json_values, "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=6),
    "seed": st.integers(-10, 2**64) | json_values, "stream_options": json_values,
    "ignore_eos": json_values, "top_k": json_values, "repetition_penalty": json_values,
    "logprobs": json_values, "presence_penalty": json_values, "unknown_field": json_values,
}
bodies = st.one_of(
    st.fixed_dictionaries({}, optional=FIELDS).map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
)
requests = st.tuples(
    st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE", "OPTIONS", "PATCH"]),
    st.sampled_from(list(ENDPOINTS) + ["/v1/chat/completions"] * 4 + ["/v1/completions"] * 2)
    | st.text(alphabet="/abcv1%._-", max_size=20).map(lambda p: "/" + p),
    bodies,
    st.sampled_from(["application/json", "text/plain", "", "multipart/form-data; boundary=x"]),
    st.sampled_from(["Bearer key"] * 6 + [None, "Bearer wrong", "Basic abc", "Bearer"]),
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    folder = write_tiny_llama(tmp_path_factory.mktemp("fuzz") / "tiny-llama")
    # A short context keeps the replies that happen to be valid requests quick.
    live = LiveServer(load_service(str(folder), precision="fp32", max_seq_len=96, max_batch=4, max_queue=4),
                      api_key="key", max_body_bytes=4096)
    yield live
    live.close()


def test_fuzzed_requests_never_get_a_server_error(server: LiveServer) -> None:
    seen: dict[int, int] = {}
    client = httpx.Client(base_url=server.url, timeout=60)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(requests)
    def check(request) -> None:
        method, path, body, content_type, auth = request
        headers = {"Content-Type": content_type} if content_type else {}
        if auth:
            headers["Authorization"] = auth
        answer = client.request(method, path, content=body if method not in ("GET", "OPTIONS") else None,
                                headers=headers)
        seen[answer.status_code] = seen.get(answer.status_code, 0) + 1
        assert answer.status_code < 500, (request, answer.text)
        if answer.status_code >= 400 and answer.headers.get("content-type", "").startswith("application/json"):
            assert set(answer.json()["error"]) >= {"message", "type"}

    check()
    assert sum(seen.values()) >= 500
    assert {200, 400, 401} <= set(seen), seen  # the mutations reached validation and generation
    health = client.get("/health")
    assert health.status_code == 200
    reply = client.post("/v1/chat/completions", headers={"Authorization": "Bearer key"},
                        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
    assert server.metric("slm_active_sequences") == 0
