"""Issue 15, point 9: the server faults reproduced for real against a running `zagreus serve`
(its own process, the tiny chat model of test_serve_end_to_end), over HTTP and raw sockets.

- integers beyond what the model takes (a seed of 2**64) are a 400, not a 500;
- a body over the size limit is a 413, refused from its Content-Length before it is sent;
- a big body that is allowed is parsed and tokenized off the event loop: /health stays quick;
- a client that hangs up cancels its request, streaming or not;
- --max-tokens caps every request; --api-key guards /v1; a non-loopback --host needs a key or --insecure.
"""

from __future__ import annotations

import contextlib
import gc
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from test_serve_end_to_end import HELLO, HELLO_MSGS, NAME, _fit_chat_model

KEY = "test-key-7d1f"
AUTH = {"Authorization": f"Bearer {KEY}"}
CAP = 300  # the server's --max-tokens
# The fitted model continues "Il gatto" for 350 tokens without stopping (test_serve_end_to_end),
# so a request for CAP tokens runs to its limit unless it is cancelled.
LONG = {"model": NAME, "prompt": "Il gatto", "temperature": 0, "max_tokens": CAP}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, one_thread) -> Path:
    return _fit_chat_model(tmp_path_factory.mktemp("faults"))


@contextlib.contextmanager
def _serve(export: Path, log: Path, *flags: str):
    """`zagreus serve EXPORT --port 0 FLAGS` in its own process; yields its URL once uvicorn listens
    (it logs the port it was given), and prints the server's log if the test fails."""
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "zagreus.cli", "serve", str(export), "--name", NAME,
                                 "--port", "0", *flags], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 90
        while not (started := re.search(r"Uvicorn running on \S+:(\d+)", log.read_text())):
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.1)
        yield f"http://127.0.0.1:{started.group(1)}"
    except BaseException:
        print(log.read_text())
        raise
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def api(export_dir, tmp_path_factory):
    """A client of the server under test, sending its API key. One connection pool: a new httpx
    client per call would add tens of milliseconds of its own setup to each measured request."""
    log = tmp_path_factory.mktemp("server-log") / "serve.log"
    with _serve(export_dir, log, "--api-key", KEY, "--max-tokens", str(CAP), "--max-running", "8") as url:
        with httpx.Client(base_url=url, headers=AUTH, timeout=60) as client:
            yield client


def _health(api: httpx.Client) -> dict:
    return api.get("/health").json()


def _send_raw(api: httpx.Client, path: str, body: bytes, length: int | None = None) -> socket.socket:
    """A POST written on a raw socket, left open; `length` declares a Content-Length other than the body's."""
    where = api.base_url
    sock = socket.create_connection((where.host, where.port), timeout=10)
    head = (f"POST {path} HTTP/1.1\r\nHost: {where.host}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body) if length is None else length}\r\n\r\n")
    sock.sendall(head.encode() + body)
    return sock


def test_out_of_range_integers_are_a_400(api):
    url = "/v1/chat/completions"
    messages = json.dumps(HELLO_MSGS)
    cases = [  # (the rest of a request after its messages, what the error names)
        (f'"seed": {2**64}', "seed"),  # a 500 before: the worker's torch.Generator overflowed
        (f'"seed": {-(2**63) - 1}', "seed"),
        ('"max_tokens": ' + "9" * 5000, "not valid JSON"),  # past Python's 4,300-digit limit on parsing ints
        ('"repetition_penalty": Infinity', "repetition_penalty"),
        ('"stop": ["a", "b", "c", "d", "e"]', "stop"),
        ('"tools": ' + "[" * 100_000 + "]" * 100_000, "not valid JSON"),  # nested past the recursion limit
    ]
    for rest, fragment in cases:
        r = api.post(url, content=f'{{"messages": {messages}, {rest}}}')
        assert r.status_code == 400, (rest[:40], r.text)
        err = r.json()["error"]
        assert fragment in err["message"] and err["type"] == "invalid_request_error", (rest[:40], err)
    # The widest seeds the generator takes still work.
    for seed in (2**64 - 1, -(2**63)):
        r = api.post(url, json={"messages": HELLO_MSGS, "seed": seed, "max_tokens": 4})
        assert r.status_code == 200, r.text


def test_oversized_body_is_a_413(api):
    url = "/v1/chat/completions"
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 5_000_000}]}).encode()
    # Declared too large: refused before the client has sent a byte of it.
    with _send_raw(api, url, b"", length=len(big)) as sock:
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        error = json.loads(reply.read())["error"]
    assert reply.status == 413 and error["code"] == "request_too_large" and "1048576 bytes" in error["message"]
    # Sent whole, and sent chunked with no Content-Length: 413 all the same.
    r = api.post(url, content=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = api.post(url, content=(big[i : i + 65536] for i in range(0, len(big), 65536)))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = api.post(url, json={"messages": HELLO_MSGS, "temperature": 0})
    assert r.json()["choices"][0]["message"]["content"] == HELLO


def test_big_allowed_body_leaves_health_quick(api):
    """Three ~1 MB prompts at once, each a fraction of a second to parse and tokenize: /health,
    asked all the while, never waits for one of them (it waited for all of them before)."""
    body = json.dumps({"messages": [{"role": "user", "content": "Il gatto dorme sul divano mentre piove. " * 24_000}]})
    assert 900_000 < len(body) < 1 << 20  # big, but under the default limit
    replies: list[httpx.Response] = []

    def post() -> None:
        replies.append(api.post("/v1/chat/completions", content=body))

    t0 = time.perf_counter()
    post()
    alone = time.perf_counter() - t0  # what an event loop doing the work would stall for, per prompt
    senders = [threading.Thread(target=post) for _ in range(3)]
    latencies = []
    gc.disable()  # a full collection in this process (torch loaded) would pause the probe for a second
    try:
        for t in senders:
            t.start()
        while any(t.is_alive() for t in senders):
            t0 = time.perf_counter()
            assert api.get("/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.01)
    finally:
        gc.enable()
    assert [r.json()["error"]["code"] for r in replies] == ["context_length_exceeded"] * 4
    assert len(latencies) >= 5, latencies
    bound = min(0.2, alone / 2)
    assert max(latencies) < bound, f"/health took {max(latencies) * 1000:.0f} ms (a prompt alone: {alone * 1000:.0f} ms)"


def test_disconnected_clients_are_cancelled(api):
    """Four plain and four streaming requests on raw sockets, closed once they generate: all stop."""
    full = api.post("/v1/completions", json=LONG).json()["usage"]
    assert full["completion_tokens"] == CAP  # the premise: left alone, each runs to its limit
    before = _health(api)["tokens_generated"]
    socks = [_send_raw(api, "/v1/completions", json.dumps({**LONG, "stream": stream}).encode())
             for stream in (False, True) * 4]
    deadline = time.time() + 20
    while (health := _health(api))["running"] < len(socks) or health["tokens_generated"] == before:
        assert time.time() < deadline, health
        time.sleep(0.005)
    for sock in socks:
        sock.close()
    while (health := _health(api))["running"] or health["waiting"]:
        assert time.time() < deadline, health
        time.sleep(0.01)
    stopped = health["tokens_generated"]
    time.sleep(0.3)
    assert _health(api)["tokens_generated"] == stopped
    # Uncancelled, the four plain requests alone would have produced 4 * CAP tokens.
    assert stopped - before < 4 * CAP / 2, stopped - before


def test_token_cap(api):
    """max_tokens above --max-tokens, or null (no limit asked), is clamped to it; the context had room for more."""
    for max_tokens in (1000, None):
        r = api.post("/v1/completions", json={**LONG, "max_tokens": max_tokens})
        body = r.json()
        assert body["usage"]["completion_tokens"] == CAP and body["choices"][0]["finish_reason"] == "length", body
        assert body["usage"]["prompt_tokens"] + CAP < _health(api)["context_length"]


def test_api_key(api):
    from openai import AuthenticationError, OpenAI

    server = str(api.base_url).rstrip("/")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.get(server + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
        assert r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(server + "/v1/chat/completions", json={"messages": HELLO_MSGS}, headers=headers)
        assert r.status_code == 401, headers
    assert httpx.get(server + "/health").status_code == 200  # health checks need no key
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    client = OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [NAME]
    r = client.chat.completions.create(model=NAME, messages=HELLO_MSGS, temperature=0)
    assert r.choices[0].message.content == HELLO


def test_non_loopback_host_needs_a_key(export_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "zagreus.cli", "serve", str(export_dir), "--host", "0.0.0.0",
                           "--port", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("error: --host 0.0.0.0 ") and "--api-key" in line and "--insecure" in line
    with _serve(export_dir, tmp_path / "insecure.log", "--host", "0.0.0.0", "--insecure") as url:
        assert httpx.get(url + "/health").json()["status"] == "ok"
    from zagreus.serve.commands import _loopback

    assert all(map(_loopback, ["localhost", "127.0.0.1", "127.1.2.3", "::1", "[::1]"]))
    assert not any(map(_loopback, ["0.0.0.0", "::", "192.168.1.5", "example.org"]))
