"""The server end to end: the official openai client against a live uvicorn on localhost.

The model is trained in the fixture (a few seconds) to answer fixed questions word for word
with a <think> block, so greedy answers are known exactly: any mixing between concurrent
requests, lost token or leaked think tag shows as a wrong string.
"""
from __future__ import annotations

import asyncio
import io
import random
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from r1kit.engine import SamplingParams  # noqa: E402
from r1kit.serve.backends import load_backend  # noqa: E402
from r1kit.serve.scheduler import RequestFailed, Scheduler  # noqa: E402
from r1kit.serve.server import create_app  # noqa: E402
from r1kit.serve.testing import ServerThread, qa_pairs, tiny_reasoning_checkpoint  # noqa: E402
from r1kit.serve.text import ChoiceText  # noqa: E402

PAIRS = qa_pairs()  # (question, reasoning, answer)


@pytest.fixture(scope="module", params=["llama", "deepseek"])
def ckpt(request, tmp_path_factory):
    """Every test below runs on a dense and on a DeepSeek-V3 (MLA latent cache, MoE) checkpoint."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead on a shared machine
    try:
        return tiny_reasoning_checkpoint(tmp_path_factory.mktemp("serve") / request.param, family=request.param)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(ckpt):
    backend = load_backend(str(ckpt), name="tiny", max_batch=8)
    assert backend.kv_cache_bytes() == backend.batch.cache.nbytes() > 0
    with ServerThread(create_app(backend)) as url:
        yield SimpleNamespace(url=url, backend=backend)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def ask(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def health(server) -> dict:
    return httpx.get(server.url + "/health").json()


# ---------------------------------------------------------------------------------------------
# the openai client
# ---------------------------------------------------------------------------------------------
def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert health(server)["status"] == "ok"


def test_non_stream_separates_reasoning(client, server):
    q, r, a = PAIRS[0]
    out = client.chat.completions.create(model="tiny", messages=ask(q), temperature=0, max_tokens=60)
    msg = out.choices[0].message
    assert (msg.reasoning_content, msg.content) == (r, a)
    assert "<think>" not in msg.content and "</think>" not in msg.content
    assert out.choices[0].finish_reason == "stop"
    prompt_len = len(server.backend.prompt(ask(q))[0])
    u = out.usage
    assert u.prompt_tokens == prompt_len and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert 0 < u.completion_tokens_details.reasoning_tokens < u.completion_tokens


def test_stream_matches_non_stream(client):
    q, r, a = PAIRS[1]
    stream = client.chat.completions.create(model="tiny", messages=ask(q), temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    reasoning, content, finish, usage = "", "", None, None
    for ch in stream:
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    assert (reasoning, content, finish) == (r, a, "stop")
    assert usage.completion_tokens > usage.completion_tokens_details.reasoning_tokens > 0


def test_n_choices_and_seed(client):
    q, r, a = PAIRS[2]
    greedy = client.chat.completions.create(model="tiny", messages=ask(q), temperature=0, n=3)
    assert [(c.index, c.message.content) for c in greedy.choices] == [(0, a), (1, a), (2, a)]
    assert greedy.usage.completion_tokens == 3 * (greedy.usage.completion_tokens // 3)
    sampled = [client.chat.completions.create(model="tiny", messages=ask("Tell me"), temperature=1.5, n=4,
                                              seed=7, max_tokens=12) for _ in range(2)]
    texts = [[(c.message.reasoning_content, c.message.content) for c in s.choices] for s in sampled]
    assert texts[0] == texts[1]  # a seed makes sampling reproducible, batched or not
    assert len(set(texts[0])) > 1  # and each choice draws its own numbers


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings(client, stream):
    q, r, a = PAIRS[3]
    cases = [(["twice"], r.split(" twice")[0].strip(), ""),  # stops inside the reasoning
             (["!", "zzz"], r, a.rstrip("!"))]  # stops inside the answer
    for stop, want_r, want_a in cases:
        got = client.chat.completions.create(model="tiny", messages=ask(q), temperature=0, stop=stop, stream=stream)
        if stream:
            parts = [c for ch in got for c in ch.choices]
            got_r = "".join(getattr(c.delta, "reasoning_content", None) or "" for c in parts)
            got_a = "".join(c.delta.content or "" for c in parts)
            finish = [c.finish_reason for c in parts if c.finish_reason]
        else:
            m = got.choices[0].message
            got_r, got_a, finish = m.reasoning_content, m.content, [got.choices[0].finish_reason]
        assert (got_r, got_a, finish) == (want_r, want_a, ["stop"]), stop


def test_max_tokens_and_max_completion_tokens(client):
    q = PAIRS[4][0]
    for key in ("max_tokens", "max_completion_tokens"):
        out = client.chat.completions.create(model="tiny", messages=ask(q), temperature=0, **{key: 5})
        assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5
        assert out.choices[0].message.content == ""  # still reasoning when cut


# ---------------------------------------------------------------------------------------------
# continuous batching
# ---------------------------------------------------------------------------------------------
def test_32_concurrent_streams_each_get_their_answer(server):
    order = list(range(32))
    random.Random(0).shuffle(order)  # arrival order differs from the training order

    async def one(aclient, i):
        q, _, _ = PAIRS[i]
        await asyncio.sleep(0.005 * (i % 5))  # staggered arrivals join a batch already running
        stream = await aclient.chat.completions.create(model="tiny", messages=ask(q), temperature=0, stream=True)
        r, a = "", ""
        async for ch in stream:
            for c in ch.choices:
                r += getattr(c.delta, "reasoning_content", None) or ""
                a += c.delta.content or ""
        return r, a

    async def run_all():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        async with aclient:
            return await asyncio.gather(*(one(aclient, i) for i in order))

    peak = []
    stop = threading.Event()

    def watch():  # how many rows ran at once, seen from outside
        with httpx.Client() as h:
            while not stop.is_set():
                peak.append(h.get(server.url + "/health").json()["running"])
                time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = asyncio.run(run_all())
    finally:
        stop.set()
        watcher.join()
    for i, got in zip(order, results):
        assert got == PAIRS[i][1:], f"client {i} ({PAIRS[i][0]!r})"
    assert max(peak) > 1  # requests really shared decoding steps
    assert max(peak) <= server.backend.capacity


def _wait_idle(server, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = health(server)
        if h["running"] == 0 and h["waiting"] == 0:
            return h
        time.sleep(0.05)
    raise AssertionError(f"server still busy: {h}")


def test_disconnects_free_slots_and_server_stays_healthy(server, client):
    before = _wait_idle(server)
    # 1000 tokens a row: far more than the few steps a disconnect takes to be noticed
    body = {"model": "tiny", "messages": ask(PAIRS[5][0]), "max_tokens": 1000, "ignore_eos": True,
            "temperature": 0, "stream": True}

    def hang_up_mid_stream(_):
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as res:
            assert res.status_code == 200
            next(res.iter_lines())  # the first event, then leave

    def give_up_waiting(_):  # a non-streaming client that times out
        try:
            httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False, "n": 8}, timeout=0.2)
        except httpx.ReadTimeout:
            return 1
        return 0

    with ThreadPoolExecutor(12) as pool:  # more clients than slots: some leave while still waiting
        list(pool.map(hang_up_mid_stream, range(12)))
        # 4 × 8 rows for 8 slots: each gives up running or waiting
        timeouts = sum(pool.map(give_up_waiting, range(4)))
    assert timeouts == 4
    after = _wait_idle(server)  # every slot free again: nothing still decodes for a client that left
    # every hang-up had its answer started, so it was submitted and is cancelled; a client that gives up before the
    # server has read its request (a loaded machine: 0.2 s) was never submitted, so it has nothing to cancel
    assert 12 <= after["cancelled"] - before["cancelled"] <= 12 + timeouts
    assert after["finished"] == before["finished"]  # none of those 1000-token requests ran to its end
    q, r, a = PAIRS[5]
    out = client.chat.completions.create(model="tiny", messages=ask(q), temperature=0)
    assert (out.choices[0].message.reasoning_content, out.choices[0].message.content) == (r, a)


# ---------------------------------------------------------------------------------------------
# bad input: OpenAI-style 4xx, never a 500, and the server keeps serving
# ---------------------------------------------------------------------------------------------
GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me about apple."}]}
BAD = [
    (b"{not json", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, "invalid_json"),
    ({**GOOD, "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ({**GOOD, "max_tokens": -5}, 400, "max_tokens", "invalid_value"),
    ({**GOOD, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({**GOOD, "max_tokens": 2.5}, 400, "max_tokens", "invalid_type"),
    ({**GOOD, "n": True}, 400, "n", "invalid_type"),
    ({**GOOD, "stop": 5}, 400, "stop", "invalid_type"),
    ({**GOOD, "stop": {"x": 1}}, 400, "stop", "invalid_type"),
    ({**GOOD, "top_p": 0}, 400, "top_p", "invalid_value"),
    ({**GOOD, "messages": "hi"}, 400, "messages", "invalid_type"),
    ({**GOOD, "messages": []}, 400, "messages", "invalid_value"),
    ({**GOOD, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", "invalid_value"),
    ({**GOOD, "messages": [{"role": "user", "content": 3}]}, 400, "messages.0.content", "invalid_type"),
    ({"messages": GOOD["messages"]}, 400, "model", "missing_required_parameter"),
    ({**GOOD, "model": "gpt-9"}, 404, "model", "model_not_found"),
    ({**GOOD, "messages": [{"role": "user", "content": "apple " * 1200}]}, 400, "messages", "context_length_exceeded"),
    ({**GOOD, "max_tokens": 100000}, 400, "messages", "context_length_exceeded"),
    ({**GOOD, "logprobs": True}, 400, "logprobs", "unsupported_parameter"),
]


@pytest.mark.parametrize("body,status,param,code", BAD, ids=[f"{i}-{b[2] or b[3]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors(server, body, status, param, code):
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    res = httpx.post(server.url + "/v1/chat/completions", timeout=30, **kw)
    assert res.status_code == status, res.text
    err = res.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["param"], err["code"]) == (param, code)
    assert health(server)["status"] == "ok"


def test_errors_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=ask("apple " * 1200))
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=ask("hi"))
    res = httpx.get(str(client.base_url) + "no/such/route")
    assert res.status_code == 404 and res.json()["error"]["type"] == "not_found_error"
    q, r, a = PAIRS[6]
    assert client.chat.completions.create(model="tiny", messages=ask(q), temperature=0).choices[0].message.content == a


# ---------------------------------------------------------------------------------------------
# the checkpoint's own generation_config.json
# ---------------------------------------------------------------------------------------------
def test_serve_adopts_the_checkpoints_generation_config(ckpt, tmp_path):
    import json

    from r1kit.serve.backends import BackendError
    from r1kit.serve.protocol import ChatRequest
    from r1kit.serve.server import _prepare
    own = tmp_path / "own"
    shutil.copytree(ckpt, own)
    (own / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.3, "top_p": 0.8,
                                                            "top_k": 20, "eos_token_id": [1]}))
    backend = load_backend(str(own), name="tiny")
    assert backend.defaults == {"temperature": 0.3, "top_p": 0.8, "top_k": 20}
    _, _, params = _prepare(backend, ChatRequest(model="tiny", messages=ask("hi")))
    assert (params[0].temperature, params[0].top_p, params[0].top_k) == (0.3, 0.8, 20)
    _, _, params = _prepare(backend, ChatRequest(model="tiny", messages=ask("hi"), temperature=1.2, top_k=0))
    assert (params[0].temperature, params[0].top_p, params[0].top_k) == (1.2, 0.8, 0)  # the request wins
    (own / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.7}))
    assert load_backend(str(own), name="tiny").defaults == {"temperature": 0.0}  # published as greedy
    (own / "generation_config.json").unlink()
    assert load_backend(str(own), name="tiny").defaults == {}
    from r1kit.formats.hf import CheckpointError
    for bad, needle, error in [({"top_p": 1.5}, "'top_p' must be a number in (0, 1], got 1.5", BackendError),
                               ({"top_k": "50"}, "'top_k' must be an integer ≥ 0", BackendError),
                               ("{oops", "invalid JSON at line 1", CheckpointError)]:  # the loader reads the file
        (own / "generation_config.json").write_text(bad if isinstance(bad, str) else json.dumps(bad))
        with pytest.raises(error, match="generation_config.json") as e:
            load_backend(str(own), name="tiny")
        assert needle in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# failures stay with the request that caused them
# ---------------------------------------------------------------------------------------------
async def _collect(handle):
    """→ {choice index: tokens} when the request completes, or the RequestFailed message."""
    tokens: dict[int, list] = {}
    try:
        async for index, token, _ in handle.events():
            tokens.setdefault(index, []).append(token)
    except RequestFailed as e:
        return str(e)
    return tokens


def _answered(backend, tokens, pair) -> bool:
    text = backend.decode(tokens)
    return pair[1] in text and text.rstrip().endswith(pair[2])


def test_a_failing_request_fails_alone(ckpt):
    backend = load_backend(str(ckpt), name="tiny", max_batch=4)
    cache = backend.batch.cache
    prompts = [backend.prompt(ask(q))[0] for q, _, _ in PAIRS[:3]]
    greedy = SamplingParams(max_new_tokens=60, temperature=0)
    bad_stop = SamplingParams(max_new_tokens=60, temperature=0, stop=("never",))
    bad_stop.stop = (5,)  # set after validation: its stop check raises TypeError on the first token

    async def run():
        sched = Scheduler(backend)
        sched.start()
        try:  # all admitted in one tick, so they share one prefill that fails
            handles = [sched.submit(prompts[0], [greedy]),
                       sched.submit(prompts[1][:-1] + [10 ** 6], [greedy, greedy]),  # no such token: prefill raises
                       sched.submit(prompts[1], [greedy]),
                       sched.submit(prompts[2], [bad_stop])]
            return await asyncio.gather(*(_collect(h) for h in handles))
        finally:
            await sched.stop()

    ok0, bad_prompt, ok1, bad = asyncio.run(run())
    assert _answered(backend, ok0[0], PAIRS[0]) and _answered(backend, ok1[0], PAIRS[1])
    assert "IndexError" in bad_prompt and "TypeError" in bad
    assert backend.batch.cache is cache and backend.active == 0


def test_a_failed_step_fails_its_rows_and_keeps_the_cache(ckpt, monkeypatch):
    backend = load_backend(str(ckpt), name="tiny", max_batch=4)
    cache, step = backend.batch.cache, backend.batch.step
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return step()

    monkeypatch.setattr(backend.batch, "step", flaky)
    prompts = [backend.prompt(ask(q))[0] for q, _, _ in PAIRS[:2]]
    greedy = SamplingParams(max_new_tokens=60, temperature=0)

    async def run():
        sched = Scheduler(backend)
        sched.start()
        try:
            first = await asyncio.gather(*(_collect(sched.submit(p, [greedy])) for p in prompts))
            again = await _collect(sched.submit(prompts[0], [greedy]))
            return first, again
        finally:
            await sched.stop()

    first, again = asyncio.run(run())
    assert all("out of memory" in f for f in first)
    assert backend.batch.cache is cache  # reset() reuses the KV cache, no second allocation
    assert _answered(backend, again[0], PAIRS[0])


# ---------------------------------------------------------------------------------------------
# the pieces without a server
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opened_by_template", [True, False])
def test_streamed_parts_equal_the_final_split(opened_by_template):
    """However the text is cut into tokens, the deltas add up to the final reasoning/content."""
    full = ("" if opened_by_template else " <think>") + "\n let </thin me think </think>\n\nThe answer: 42.</STOP>more"
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(full)), 12))
        pieces = [full[a:b] for a, b in zip([0] + cuts, cuts + [len(full)])]
        text = ChoiceText(lambda ids: "".join(pieces[i] for i in ids), ("</STOP>",), opened_by_template)
        r = a = ""
        for i in range(len(pieces)):
            d = text.push(i)
            r, a = r + d.reasoning, a + d.content
        d = text.finish()
        assert (r + d.reasoning, a + d.content) == (text.reasoning, text.content) == \
            ("let </thin me think", "The answer: 42.")


def test_terminal_chat(ckpt, monkeypatch, capsys):
    from r1kit.cli import main
    q0, r0, a0 = PAIRS[0]
    q1, _, a1 = PAIRS[1]
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{q0}\n/help\n/reset\n{q1}\n/exit\n"))
    assert main(["chat", str(ckpt), "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert r0 in out and a0 in out and a1 in out
    assert "conversation cleared" in out and "unknown command /help" in out


# ---------------------------------------------------------------------------------------------
# the web chat in a real (headless) browser
# ---------------------------------------------------------------------------------------------
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
def test_web_chat_in_headless_chromium(server):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1000,700"):
        opts.add_argument(flag)
    # an explicit driver path: Selenium then never tries to download one
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        driver.get(server.url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "tiny")
        driver.find_element(By.ID, "temperature").send_keys("0")  # greedy: answers known in advance
        # record (reasoning, answer) lengths at every change of the page, to see the streaming
        driver.execute_script("""
            window.seen = [];
            new MutationObserver(() => {
                const all = document.querySelectorAll('.msg.assistant'), last = all[all.length - 1];
                if (last) window.seen.push([last.querySelector('.reasoning .text').textContent.length,
                                            last.querySelector('.answer').textContent.length]);
            }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});""")
        # the second turn goes with the first as history; the model never saw two turns in
        # training, so the API tells what greedy decoding answers to that history
        (q0, r0, a0), (q1, _, _) = PAIRS[7:9]
        api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        m = api.chat.completions.create(model="tiny", temperature=0, messages=[
            *ask(q0), {"role": "assistant", "content": a0}, *ask(q1)]).choices[0].message
        for turn, (q, r, a) in enumerate([(q0, r0, a0), (q1, m.reasoning_content, m.content)]):
            box = driver.find_element(By.ID, "input")
            box.send_keys(q)
            box.send_keys("\n")
            # this turn's reply is finished (its answer may be empty: the model was never trained on two turns)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant.done")) > turn)
            last = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
            thought = last.find_element(By.CSS_SELECTOR, "details.reasoning .text").get_attribute("textContent")
            assert thought == r
            assert last.find_element(By.CSS_SELECTOR, ".answer").text == a
        assert [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.user")] == [q0, q1]
        seen = driver.execute_script("return window.seen")
        assert len({r for r, _ in seen}) > 2  # the reasoning grew piece by piece
        assert any(r > 0 and a == 0 for r, a in seen)  # and showed before the answer began
        driver.save_screenshot("/tmp/r1kit_web_chat.png")
    finally:
        driver.quit()


# ---------------------------------------------------------------------------------------------
# a .gguf file through llama.cpp
# ---------------------------------------------------------------------------------------------
def test_gguf_through_llama_cpp(ckpt, tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    from r1kit.export import export_checkpoint
    path = tmp_path / "tiny.gguf"
    export_checkpoint(ckpt, path, quant="F32")  # what `r1kit export` writes
    backend = load_backend(str(path), max_len=256)
    assert backend.name == "tiny" and backend.capacity == 1
    with ServerThread(create_app(backend)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        q, r, a = PAIRS[10]
        m = client.chat.completions.create(model="tiny", messages=ask(q), temperature=0).choices[0].message
        assert (m.reasoning_content, m.content) == (r, a)

        def streamed(i):  # concurrent requests queue up and are served one after another
            q = PAIRS[i][0]
            parts = [c.delta for ch in client.chat.completions.create(
                model="tiny", messages=ask(q), temperature=0, stream=True) for c in ch.choices]
            return ("".join(getattr(d, "reasoning_content", None) or "" for d in parts),
                    "".join(d.content or "" for d in parts))

        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(streamed, [11, 12, 13])) == [PAIRS[i][1:] for i in (11, 12, 13)]
        two = client.chat.completions.create(model="tiny", messages=ask(q), temperature=0, n=2, max_tokens=4)
        assert [c.finish_reason for c in two.choices] == ["length", "length"] and two.usage.completion_tokens == 8


def test_gguf_without_llama_cpp_says_what_to_install(monkeypatch, tmp_path):
    from r1kit.serve.backends import BackendError
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # as if not installed
    with pytest.raises(BackendError, match="pip install llama-cpp-python"):
        load_backend(str(tmp_path / "model.gguf"))
