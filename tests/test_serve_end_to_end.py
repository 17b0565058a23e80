"""`zagreus serve` and `zagreus chat` end to end, against references computed with
zagreus.model.generate on the same export.

The model is tiny (2 layers, d=64) over a small BPE trained here, fitted for a few seconds on
three conversations (one a Hermes-style tool call) so its greedy answers to those are known text
and a real tool call; every other prompt gets whatever the weights give, compared exactly with
the greedy reference. The server runs in a thread under uvicorn on a free port and is queried
with the official `openai` client, raw HTTP, and headless Chromium.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
HELLO = "Hello! How can I help you today?"
CIAO = "Sto bene, grazie! E tu?"
TRAINED = [
    ([{"role": "user", "content": "What is the weather in Rome?"},
      {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome"}}]}],
     [WEATHER]),
    ([{"role": "user", "content": "Say hello"}, {"role": "assistant", "content": HELLO}], None),
    ([{"role": "user", "content": "Ciao, come stai?"}, {"role": "assistant", "content": CIAO}], None),
]
NAME = "tiny-chat"


def _fit_chat_model(out: Path) -> Path:
    """Train a BPE and a tiny model on TRAINED (assistant-only loss) and export it with ChatML."""
    import torch.nn.functional as F

    from zagreus.model.config import resolve_model_config
    from zagreus.model.hf import save_hf
    from zagreus.model.llama import Transformer
    from zagreus.post.chat import TOOLS_POSTAMBLE, TOOLS_PREAMBLE, jinja_template, render
    from zagreus.tokenizer import train_bpe

    corpus = [TOOLS_PREAMBLE + TOOLS_POSTAMBLE, json.dumps(WEATHER)] + [
        m["content"] for conv, _ in TRAINED for m in conv] + [
        "The quick brown fox jumps over the lazy dog. Il gatto dorme sul divano mentre piove a Roma."] * 3
    tok = train_bpe(corpus * 5, 600, out / "tokenizer")
    cfg = resolve_model_config("tiny", vocab_size=tok.vocab_size, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                               intermediate_size=192, max_seq_len=384, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(0)
    seqs = [render(conv, tok, tools=tools) for conv, tools in TRAINED]
    width = max(len(s.ids) for s in seqs)
    x = torch.zeros(len(seqs), width, dtype=torch.long)
    y = torch.full((len(seqs), width), -100)
    for i, s in enumerate(seqs):
        ids, mask = torch.tensor(s.ids), torch.tensor(s.assistant_mask)
        x[i, : len(ids)] = ids
        y[i, : len(ids) - 1] = torch.where(mask[1:], ids[1:], -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(300):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    export = out / "export"
    save_hf(model, tok, export, chat_template=jinja_template("chatml"))
    return export


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, one_thread) -> Path:
    return _fit_chat_model(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def reference(export_dir):
    """Greedy replies computed directly with zagreus.model.generate on a separately loaded copy."""
    from zagreus.model.generate import SamplingParams, generate
    from zagreus.checkpoint import load_model_and_tokenizer
    from zagreus.post.chat import render, stop_token_ids

    model, tok = load_model_and_tokenizer(export_dir)
    model.eval()
    ctx = model.cfg.max_seq_len

    class Ref:
        tokenizer = tok
        context = ctx

        @staticmethod
        def chat_ids(messages, tools=None):
            return render(messages, tok, template="chatml", tools=tools, add_generation_prompt=True).ids

        @staticmethod
        def chat(messages, max_tokens=None, tools=None) -> tuple[str, list[int]]:
            prompt = Ref.chat_ids(messages, tools)
            out = generate(model, prompt, SamplingParams(max_new_tokens=max_tokens or ctx - len(prompt),
                                                         stop_ids=stop_token_ids(tok, "chatml")))
            return tok.decode(out), out

        @staticmethod
        def complete(prompt: str, max_tokens: int) -> str:
            ids = tok.encode(prompt, bos=True)
            return tok.decode(generate(model, ids, SamplingParams(max_new_tokens=max_tokens, stop_ids=[tok.eos_id])))

    return Ref


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(export_dir):
    import uvicorn

    from zagreus.serve.engine import open_engine
    from zagreus.serve.server import create_app

    engine = open_engine(export_dir, name=NAME, max_active=4)  # 4: the 8-request test also queues
    assert engine.template == "chatml"  # read from the export's chat_template
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


HELLO_MSGS = [{"role": "user", "content": "Say hello"}]


def test_trained_model_gives_its_answers(reference):
    """The fixture itself: the fitted model answers its trained prompts (else later checks prove little)."""
    assert reference.chat(HELLO_MSGS)[0] == HELLO
    assert reference.chat([{"role": "user", "content": "Ciao, come stai?"}])[0] == CIAO
    weather = reference.chat([{"role": "user", "content": "What is the weather in Rome?"}], tools=[WEATHER])[0]
    assert weather == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [NAME]
    health = httpx.get(server + "/health").json()
    assert {k: health[k] for k in ("status", "model", "context_length", "template", "running", "waiting")} == {
        "status": "ok", "model": NAME, "context_length": 384, "template": "chatml", "running": 0, "waiting": 0}


def test_chat_greedy_equals_generate(client, reference):
    r = client.chat.completions.create(model=NAME, messages=HELLO_MSGS, temperature=0)
    assert r.choices[0].message.content == HELLO
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(reference.chat_ids(HELLO_MSGS))
    assert r.usage.completion_tokens == len(reference.chat(HELLO_MSGS)[1])
    # An untrained prompt: whatever the weights say, token for token, cut at max_tokens.
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Il gatto dorme?"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, temperature=0, max_tokens=20)
    text, ids = reference.chat(msgs, max_tokens=20)
    assert r.choices[0].message.content == text
    assert r.usage.completion_tokens == len(ids)
    assert r.choices[0].finish_reason == ("length" if len(ids) == 20 else "stop")


def test_chat_streaming(client, reference):
    msgs = [{"role": "user", "content": "The quick brown fox"}]
    expected, ids = reference.chat(msgs, max_tokens=24)
    stream = client.chat.completions.create(model=NAME, messages=msgs, temperature=0, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == expected
    assert len(pieces) > 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ("length" if len(ids) == 24 else "stop")
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == len(ids)
    # The trained reply streams token by token too.
    stream = client.chat.completions.create(model=NAME, messages=HELLO_MSGS, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(pieces) == HELLO and sum(1 for p in pieces if p) > 1


def test_stop_strings(client):
    r = client.chat.completions.create(model=NAME, messages=HELLO_MSGS, temperature=0, stop=["!"])
    assert r.choices[0].message.content == "Hello" and r.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=NAME, messages=HELLO_MSGS, temperature=0, stop=["help"], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "Hello! How can I "


def test_tool_calls(client, reference):
    msgs = [{"role": "user", "content": "What is the weather in Rome?"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, tools=[WEATHER], temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Rome"}
    # The call goes back into the conversation in OpenAI's shape, with the tool's result.
    follow = msgs + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
    r2 = client.chat.completions.create(model=NAME, messages=follow, tools=[WEATHER], temperature=0, max_tokens=5)
    assert r2.usage.completion_tokens <= 5
    # Streaming: no markup leaks into the content; the call arrives as a tool_calls delta.
    stream = list(client.chat.completions.create(model=NAME, messages=msgs, tools=[WEATHER], temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in stream) == ""
    [delta_call] = [tc for c in stream for tc in (c.choices[0].delta.tool_calls or [])]
    assert delta_call.function.name == "get_weather" and json.loads(delta_call.function.arguments) == {"city": "Rome"}
    assert stream[-1].choices[0].finish_reason == "tool_calls"
    # tool_choice "none": the tools are not offered, so the prompt is the plain one.
    r3 = client.chat.completions.create(model=NAME, messages=msgs, tools=[WEATHER], tool_choice="none",
                                        temperature=0, max_tokens=16)
    assert r3.choices[0].message.content == reference.chat(msgs, max_tokens=16)[0]


def test_completions(client, reference):
    r = client.completions.create(model=NAME, prompt="The quick brown", max_tokens=12, temperature=0)
    expected = reference.complete("The quick brown", 12)
    assert r.choices[0].text == expected
    stream = client.completions.create(model=NAME, prompt="The quick brown", max_tokens=12, temperature=0, stream=True)
    pieces = [c.choices[0].text for c in stream]
    assert "".join(pieces) == expected and sum(1 for p in pieces if p) > 1


def test_concurrent_requests_match_solo(client, reference):
    """8 requests at once (greedy and seeded sampling) each get exactly their solo reply."""
    prompts = ["Say hello", "Ciao, come stai?", "Il gatto dorme sul divano", "The lazy dog", "Roma",
               "What is the weather?", "brown fox", "piove a Roma"]

    def ask(i: int) -> str:
        kwargs = {"temperature": 0} if i % 2 == 0 else {"temperature": 0.9, "top_p": 0.9, "seed": 100 + i}
        r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompts[i]}],
                                           max_tokens=24, **kwargs)
        return r.choices[0].message.content

    solo = [ask(i) for i in range(len(prompts))]
    assert solo[0] == HELLO and solo[2] == reference.chat([{"role": "user", "content": prompts[2]}], 24)[0]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, range(len(prompts))))
    assert together == solo
    assert len(set(solo)) > 4  # different prompts really gave different replies


def test_abandoned_stream_is_cancelled(server, client):
    """A client that hangs up mid-stream stops its generation; the server stays consistent."""
    body = {"model": NAME, "prompt": "Il gatto", "temperature": 0, "max_tokens": 350}
    full = client.completions.create(**body).usage.completion_tokens
    assert full == 350  # the premise: left alone, this request runs to its limit
    before = httpx.get(server + "/health").json()["tokens_generated"]
    with httpx.stream("POST", server + "/v1/completions", json={**body, "stream": True}) as r:
        events = (line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(next(events)[6:])["choices"][0]["text"]
        # Hang up after the first token.
    deadline = time.time() + 20
    while (health := httpx.get(server + "/health").json())["running"] or health["waiting"]:
        assert time.time() < deadline
        time.sleep(0.02)
    assert health["tokens_generated"] - before < full


def test_bad_requests(server, client, reference):
    import openai

    url = server + "/v1/chat/completions"
    cases = [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), "role 'wizard'"),
        (json.dumps({"messages": []}).encode(), "non-empty list"),
        (json.dumps({"messages": [{"role": "user"}]}).encode(), "missing 'content'"),
        (json.dumps({"model": NAME}).encode(), "messages: Field required"),
        (json.dumps({"messages": HELLO_MSGS, "temperature": -1}).encode(), "temperature"),
        (json.dumps({"messages": HELLO_MSGS, "n": 3}).encode(), "n:"),
        (json.dumps({"messages": HELLO_MSGS, "logprobs": True}).encode(), "logprobs: not supported"),
    ]
    for body, fragment in cases:
        r = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, body
        err = r.json()["error"]
        assert fragment in err["message"] and err["type"] == "invalid_request_error", (body, err)
    # Longer than the context: a 400 that says so, through the official client too.
    long = [{"role": "user", "content": "Il gatto dorme sul divano. " * 200}]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=NAME, messages=long)
    assert exc.value.code == "context_length_exceeded" and "context is 384 tokens" in exc.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="gatto " * 1000)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=HELLO_MSGS)
    # max_tokens beyond the context is clipped to the room left, not an error.
    msgs = [{"role": "user", "content": "Il gatto dorme sul divano. " * 40}]
    room = reference.context - len(reference.chat_ids(msgs))
    r = client.chat.completions.create(model=NAME, messages=msgs, temperature=0, max_tokens=100_000)
    text, ids = reference.chat(msgs, max_tokens=room)
    assert r.choices[0].message.content == text and r.usage.completion_tokens == len(ids) <= room
    assert r.usage.total_tokens <= reference.context
    # The server is still healthy after all of that.
    assert client.chat.completions.create(model=NAME, messages=HELLO_MSGS, temperature=0).choices[0].message.content == HELLO


def test_chat_cli_piped(export_dir, reference, tmp_path):
    """Two user turns piped into `zagreus chat`, /reset, then a tool call shown as a structured call."""
    from zagreus.post.chat import parse_tool_calls

    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    turns = "Say hello\nIl gatto dorme?\n/reset\nWhat is the weather in Rome?\n/exit\nnever read\n"
    proc = subprocess.run([sys.executable, "-m", "zagreus.cli", "chat", str(export_dir), "--temperature", "0",
                           "--max-tokens", "30", "--tools", str(tools)],
                          input=turns, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    first = [{"role": "user", "content": "Say hello"}]
    reply1 = reference.chat(first, max_tokens=30, tools=[WEATHER])[0]
    second = first + [{"role": "assistant", "content": reply1}, {"role": "user", "content": "Il gatto dorme?"}]
    reply2 = reference.chat(second, max_tokens=30, tools=[WEATHER])[0]
    assert not parse_tool_calls(reply1)[1] and not parse_tool_calls(reply2)[1]
    expected = f'{reply1}\n{reply2}\n(conversation reset)\n\n[tool call] get_weather({{"city": "Rome"}})\n'
    assert proc.stdout == expected


def test_web_page_streams_a_reply(server, reference):
    """Headless Chromium opens the page, types a message, presses Send and sees the streamed reply."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="zagreus-chromium-")  # a fresh profile every run
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get(server + "/")
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "model").text == NAME)
        temperature = driver.find_element(By.ID, "temperature")
        temperature.clear()
        temperature.send_keys("0")
        driver.find_element(By.ID, "input").send_keys("Say hello")
        driver.find_element(By.ID, "send").click()
        done = ".msg.assistant[data-done='true']"
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, done))
        reply = driver.find_element(By.CSS_SELECTOR, done)
        text = driver.execute_script("return arguments[0].querySelector('.content').textContent", reply)
        assert text == reference.chat(HELLO_MSGS)[0] == HELLO
        assert int(reply.get_attribute("data-chunks")) > 1
        # A second turn goes out with the history and is answered too.
        driver.find_element(By.ID, "input").send_keys("Ciao, come stai?")
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, done)) == 2)
        second = driver.find_elements(By.CSS_SELECTOR, done)[1]
        text2 = driver.execute_script("return arguments[0].querySelector('.content').textContent", second)
        history = HELLO_MSGS + [{"role": "assistant", "content": HELLO}, {"role": "user", "content": "Ciao, come stai?"}]
        assert text2 == reference.chat(history, max_tokens=256)[0]
        # A message too long for the context: the page shows the server's 400 message.
        driver.execute_script("document.getElementById('input').value = arguments[0]", "gatto " * 500)
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error[data-done='true']"))
        error = driver.find_element(By.CSS_SELECTOR, ".msg.error .content").text
        assert error.startswith("error: the prompt has") and "context is 384 tokens" in error
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_chat_loop_llama3_template_and_commands(export_dir):
    """The terminal loop in-process with the Llama-3 template: replies equal generate on the
    Llama-3 rendering, /reset forgets, unknown commands print help."""
    from zagreus.model.generate import SamplingParams, generate
    from zagreus.post.chat import render, stop_token_ids
    from zagreus.serve.chat_cli import HELP, chat_loop
    from zagreus.serve.engine import open_engine

    engine = open_engine(export_dir, template="llama3")
    tok = engine.tokenizer
    assert engine.stop_ids == stop_token_ids(tok, "llama3") and tok.special_tokens["<|eot_id|>"] in engine.stop_ids
    lines = iter(["Say hello\n", "/help\n", "/reset\n", "gatto " * 500 + "\n", "Say hello\n", ""])
    out: list[str] = []
    chat_loop(engine, SamplingParams(temperature=0, max_new_tokens=12), lambda: next(lines), out.append, system="Be kind.")
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hello"}]
    prompt = render(msgs, tok, template="llama3", add_generation_prompt=True).ids
    assert prompt[:2] == [tok.bos_id, tok.special_tokens["<|start_header_id|>"]]
    expected = tok.decode(generate(engine.model, prompt, SamplingParams(max_new_tokens=12, stop_ids=engine.stop_ids)))
    too_long = [msgs[0], {"role": "user", "content": ("gatto " * 500).strip()}]
    n = len(render(too_long, tok, template="llama3", add_generation_prompt=True).ids)
    overflow = f"error: the prompt has {n} tokens but the model's context is 384 tokens and the reply needs at least one"
    assert "".join(out) == f"{expected}\n{HELP}\n(conversation reset)\n{overflow}; shorten the messages\n{expected}\n"


def test_context_policies(export_dir):
    """Server policy: ContextOverflow (-> 400). Terminal policy: drop the oldest turns after the system prompt."""
    from zagreus.post.chat import render
    from zagreus.serve.engine import ContextOverflow, open_engine

    engine = open_engine(export_dir)
    system = {"role": "system", "content": "Be kind."}
    turn = [{"role": "user", "content": "Il gatto dorme sul divano. " * 30}, {"role": "assistant", "content": "Sto bene."}]
    msgs = [system] + turn + turn + [{"role": "user", "content": "Say hello"}]

    def length(m):
        return len(render(m, engine.tokenizer, add_generation_prompt=True).ids)

    assert length(msgs) >= engine.context_length > length([system] + turn + msgs[-1:])  # the premise
    with pytest.raises(ContextOverflow, match="context is 384 tokens"):
        engine.render_chat(msgs)
    kept = engine.render_chat(msgs, truncate=True)
    assert kept == render([system] + turn + msgs[-1:], engine.tokenizer, add_generation_prompt=True).ids
    with pytest.raises(ContextOverflow):  # the last message alone is too long: nothing left to drop
        engine.render_chat([system, {"role": "user", "content": "gatto " * 1000}], truncate=True)


def _run_jobs(scheduler, prompts, params_of, stagger: int = 0) -> list[list[int]]:
    """Submit jobs (the second half once the first has started producing) and collect their tokens."""
    out: list[list[int]] = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]

    def sink(i):
        def emit(event):
            kind, value = event
            if kind == "token":
                out[i].append(value)
            else:
                assert kind == "done", event
                done[i].set()
        return emit

    half = len(prompts) // 2 if stagger else len(prompts)
    for i in range(half):
        scheduler.submit(prompts[i], params_of(i), sink(i))
    if stagger:
        deadline = time.time() + 30
        while sum(map(len, out)) < stagger:
            assert time.time() < deadline
            time.sleep(0.001)
        for i in range(half, len(prompts)):
            scheduler.submit(prompts[i], params_of(i), sink(i))
    for event in done:
        assert event.wait(60)
    return out


@pytest.mark.parametrize("max_active", [8, 3])
def test_batched_decode_matches_solo(export_dir, reference, max_active):
    """--batch: requests of different lengths joining and leaving a shared decode batch get the
    tokens they get alone (greedy: generate's; seeded sampling: the interleaved scheduler's)."""
    import dataclasses

    from zagreus.model.generate import SamplingParams, generate
    from zagreus.checkpoint import load_model_and_tokenizer
    from zagreus.post.chat import stop_token_ids
    from zagreus.serve.engine import Scheduler

    model, tok = load_model_and_tokenizer(export_dir)
    texts = ["Say hello", "Ciao, come stai?", "Il gatto dorme sul divano mentre piove a Roma", "The lazy dog",
             "Roma", "What is the weather in Rome?", "brown fox jumps", "piove"]
    prompts = [reference.chat_ids([{"role": "user", "content": t}]) for t in texts]
    stops = tuple(stop_token_ids(tok, "chatml"))

    def params_of(i):
        base = SamplingParams(max_new_tokens=10 + 3 * i, stop_ids=stops)
        return base if i % 2 == 0 else dataclasses.replace(base, temperature=0.9, top_k=50, seed=i)

    batched = Scheduler(model, max_active=max_active, batch=True)
    interleaved = Scheduler(model, max_active=max_active)
    try:
        got = _run_jobs(batched, prompts, params_of, stagger=6)
        assert batched.peak_running == max_active  # the batch really held several requests
        solo = _run_jobs(interleaved, prompts, params_of)
        alone = _run_jobs(batched, prompts[2:3], lambda _: params_of(2))
    finally:
        batched.close()
        interleaved.close()
    for i in range(0, len(prompts), 2):
        assert solo[i] == generate(model, prompts[i], params_of(i))
    assert got == solo
    assert alone[0] == solo[2]
    assert tok.decode(got[0]) == HELLO
