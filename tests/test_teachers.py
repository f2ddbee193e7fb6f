"""Remote teachers: traces over real HTTP on loopback, faults, kills, keys and bad input.

The teacher is a tiny model trained in the fixture (a few seconds) to answer a dozen arithmetic
problems with their scratch work, served by `r1kit serve` in a thread. A fault proxy (loopback,
in-process) stands between the job and the server where a test needs 429s, 500s, dropped
connections, a required API key or a server that returns no reasoning.
"""
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
import httpx  # noqa: E402
import torch  # noqa: E402

from r1kit.serve.backends import load_backend  # noqa: E402
from r1kit.serve.server import create_app  # noqa: E402
from r1kit.serve.testing import ServerThread, free_port  # noqa: E402
from r1kit.stages import distill  # noqa: E402
from r1kit.stages.distill import DistillConfig, NoTracesError  # noqa: E402
from r1kit.stages.sft import SFTConfig  # noqa: E402
from r1kit.tasks import get_task  # noqa: E402
from r1kit.teachers import TeacherError, TeacherStopped  # noqa: E402
from r1kit.training import ModelSpec  # noqa: E402

TASK_ARGS = {"digits": 2, "train_size": 300, "test_size": 20}
PROMPTS, K = 12, 2
KEY_ENV, KEY = "R1KIT_TEST_TEACHER_KEY", "sk-test-5d41402abc4b2a76b9719d911017c592"
STUDENT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
           "max_position_embeddings": 256}


def teacher_replies(task, problems):
    rng = random.Random(0)
    out = []
    for p in problems:
        text = task.trace(p, rng)  # "<think>…</think><answer>…</answer>"
        think, answer = text.split("</think>")
        out.append(f"<think>\n{think.removeprefix('<think>')}\n</think>\n{answer}")
    return out


def train_teacher(path: Path, steps: int = 400, task_args=None, tok=None, seed: int = 0):
    """A tiny model that answers the first PROMPTS training problems, reasoning first (greedy).
    Fewer `steps` give a weaker model of the same kind (a student); `tok` shares a tokenizer."""
    import r1kit
    from r1kit.models.llama import Llama, LlamaConfig
    from r1kit.tokenizer import build_bpe_tokenizer
    from r1kit.serve.testing import memorise
    from r1kit.training import pad_batch
    task = get_task("arithmetic", **(task_args or TASK_ARGS))
    problems = task.problems("train", PROMPTS)
    replies = teacher_replies(task, problems)
    tok = tok or build_bpe_tokenizer([p.prompt for p in problems] + replies, vocab_size=320, force_think=True)
    model = Llama(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)).init_weights(seed)
    rows = [tok.render_chat([{"role": "user", "content": p.prompt}, {"role": "assistant", "content": r}])
            for p, r in zip(problems, replies)]
    idx, targets = pad_batch([i for i, _ in rows], [m for _, m in rows], tok.pad_id)
    memorise(model, idx, targets, steps)
    r1kit.save(model, tok, path)
    return path


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    torch.set_num_threads(1)
    return train_teacher(tmp_path_factory.mktemp("teacher") / "tiny-teacher")


@pytest.fixture(scope="module")
def server(teacher_ckpt):
    with ServerThread(create_app(load_backend(str(teacher_ckpt), name="tiny-teacher", max_batch=8))) as url:
        yield url


class FaultProxy:
    """A loopback HTTP proxy in front of `upstream`. The i-th POST gets `plan[i % len(plan)]`:
    "ok" (forwarded), "429" (with Retry-After), "500", "drop" (connection closed, no response),
    "stall" (no response for `stall` seconds, then closed: the client's timeout must fire), "vllm" (reasoning
    in `reasoning`), "inline" (reasoning as <think>…</think> in the content), "noreason" (forwarded, reasoning and <think> blocks removed). A `key` makes it answer 401 to
    requests without `Authorization: Bearer <key>`; `delay` slows every forwarded request."""

    def __init__(self, upstream: str, plan=("ok",), key: str | None = None, retry_after: str = "0.2",
                 delay: float = 0.0, stall: float = 3.0):
        self.upstream, self.plan, self.key, self.retry_after, self.delay = upstream, plan, key, retry_after, delay
        self.stall = stall
        self.posts, self.log, self.seen_auth = 0, [], set()  # log: (arrival time, what it got)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        self.ready.wait(10)
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def _serve(self):
        asyncio.set_event_loop(self.loop)
        self.client = httpx.AsyncClient(base_url=self.upstream, timeout=60)
        srv = self.loop.run_until_complete(asyncio.start_server(self._conn, "127.0.0.1", 0))
        self.port = srv.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()
        srv.close()  # then let every open connection finish its cancellation before the loop closes
        tasks = asyncio.all_tasks(self.loop)
        for t in tasks:
            t.cancel()
        self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.run_until_complete(self.client.aclose())
        self.loop.close()

    async def _conn(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if not await self._answer(writer, method, path, headers, body):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer(self, writer, method, path, headers, body) -> bool:
        """Reply to one request; False: the connection was dropped."""
        self.seen_auth.add(headers.get("authorization", ""))
        if self.key and headers.get("authorization") != f"Bearer {self.key}":
            return self._send(writer, 401, {"error": {"message": "Incorrect API key provided", "code": "invalid_api_key"}})
        what = "ok"
        if method == "POST":
            what = self.plan[self.posts % len(self.plan)]
            self.posts += 1
            self.log.append((time.monotonic(), what))
        if what == "stall":
            await asyncio.sleep(self.stall)
        if what in ("drop", "stall"):
            return False
        if what == "429":
            return self._send(writer, 429, {"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}},
                              {"Retry-After": self.retry_after})
        if what == "500":
            return self._send(writer, 500, {"error": {"message": "upstream overloaded"}})
        await asyncio.sleep(self.delay)
        fwd = {k: v for k, v in headers.items() if k in ("content-type", "authorization")}
        r = await self.client.request(method, path, content=body, headers=fwd)
        data = r.json()
        for c in data.get("choices", []) if what in ("noreason", "vllm", "inline") else []:
            reasoning = c["message"].pop("reasoning_content", None)
            if what == "vllm":  # vLLM ≥ 0.10's reasoning parser names the field `reasoning`
                c["message"]["reasoning"] = reasoning
            if what == "inline":  # a server without a parser: the <think> block stays in the content
                c["message"]["content"] = f"<think>\n{reasoning}\n</think>\n\n{c['message']['content']}"
        return self._send(writer, r.status_code, data)

    @staticmethod
    def _send(writer, status: int, data, extra=None) -> bool:
        body = json.dumps(data).encode()
        head = [f"HTTP/1.1 {status} X", "Content-Type: application/json", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        return True


def cfg_for(out: Path, url: str, teacher_ckpt, **kw) -> DistillConfig:
    student = SFTConfig(model=ModelSpec("llama", STUDENT), tokenizer=str(teacher_ckpt), steps=3, batch_size=4,
                        max_len=128, eval_problems=0)
    base = dict(teacher=url, teacher_model="tiny-teacher", out_dir=str(out), task_args=TASK_ARGS, prompts=PROMPTS,
                k=K, temperature=0.0, max_new_tokens=48, concurrency=4, backoff_base=0.01, backoff_max=0.2,
                request_timeout=30, student=student, sample_only=True)
    return DistillConfig(**{**base, **kw})


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "traces.jsonl").read_text().splitlines()]


def as_set(out: Path) -> set[str]:
    """traces.jsonl as a set of records, without the teacher's address (each server is on its own port)."""
    return {json.dumps({k: v for k, v in r.items() if k != "teacher"}, sort_keys=True) for r in records(out)}


@pytest.fixture(scope="module")
def clean_run(server, teacher_ckpt, tmp_path_factory):
    """An uninterrupted, fault-free run straight at the server: the reference traces."""
    out = tmp_path_factory.mktemp("clean")
    distill.run(cfg_for(out, server + "/v1", teacher_ckpt))
    return out


# ---------------------------------------------------------------------------------------------
# End to end against r1kit serve
# ---------------------------------------------------------------------------------------------
def test_r1kit_serve_traces_filtered_then_student_trained(server, teacher_ckpt, clean_run, tmp_path):
    recs = records(clean_run)
    assert sorted((r["prompt_id"], r["sample"]) for r in recs) == [(p, s) for p in range(PROMPTS) for s in range(K)]
    assert all(r["reasoning_source"] == "reasoning_content" and r["reasoning"] for r in recs)
    r0 = recs[0]
    assert r0["teacher"] == {"id": server + "/v1", "model": "tiny-teacher"}
    assert r0["sampling"] == {"temperature": 0.0, "top_p": 0.95, "max_tokens": 48, "seed": 0}
    assert r0["usage"]["completion_tokens"] > 0 and r0["answer"].startswith("<answer>")
    stats = json.loads((clean_run / "rejection.json").read_text())
    assert stats["correct"] >= 20 and stats["kept"] >= 10  # the memorised teacher is (nearly) always right
    assert stats["dropped"]["duplicate"] == stats["kept"]  # temperature 0: the second sample repeats the first
    s = distill.run(cfg_for(tmp_path, server + "/v1", teacher_ckpt, sample_only=False,
                            traces=str(clean_run / "kept.jsonl")))
    assert s["student"]["steps"] == 3 and (tmp_path / "student" / "model" / "config.json").exists()


@pytest.mark.parametrize("shape", ["vllm", "inline"])
def test_every_reasoning_shape_is_stored_the_same_way(server, teacher_ckpt, clean_run, tmp_path, shape):
    with FaultProxy(server, plan=(shape,)) as url:
        distill.run(cfg_for(tmp_path, url, teacher_ckpt))
    same = lambda out: {json.dumps({k: v for k, v in r.items() if k not in ("teacher", "reasoning_source")},  # noqa: E731
                                   sort_keys=True) for r in records(out)}
    assert same(tmp_path) == same(clean_run)
    assert {r["reasoning_source"] for r in records(tmp_path)} == {"reasoning" if shape == "vllm" else "think_tags"}
    assert (tmp_path / "kept.jsonl").read_text() == (clean_run / "kept.jsonl").read_text()


# ---------------------------------------------------------------------------------------------
# Faults, kills, budgets, keys
# ---------------------------------------------------------------------------------------------
def test_faults_for_a_third_of_requests_change_nothing(server, teacher_ckpt, clean_run, tmp_path, monkeypatch,
                                                       capsys):
    monkeypatch.setenv(KEY_ENV, KEY)
    proxy = FaultProxy(server, plan=("ok", "429", "ok", "500", "ok", "drop", "ok", "stall", "ok"), key=KEY)
    with proxy as url:
        distill.run(cfg_for(tmp_path, url, teacher_ckpt, api_key_env=KEY_ENV, request_timeout=1.5))
    keys = [(r["prompt_id"], r["sample"]) for r in records(tmp_path)]
    assert len(keys) == len(set(keys)) == PROMPTS * K  # every sample exactly once
    assert as_set(tmp_path) == as_set(clean_run)
    retries = json.loads((tmp_path / "rejection.json").read_text())["this_run"]["retries"]
    assert retries.get("429") and retries.get("500") and retries.get("connection") and retries.get("timeout")
    assert proxy.seen_auth == {f"Bearer {KEY}"}  # the key was sent, on every request
    for t, what in proxy.log:  # a 429's Retry-After (0.2 s) paused every worker
        if what == "429":
            assert not [u for u, _ in proxy.log if t + 0.1 < u < t + 0.19]  # (in-flight ones may land just after)
    written = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())
    assert KEY not in written and KEY not in capsys.readouterr().out


def test_sigkill_halfway_then_restart_gives_the_same_traces(server, teacher_ckpt, clean_run, tmp_path):
    with FaultProxy(server, plan=("ok", "ok", "500"), delay=0.15) as url:
        recipe = tmp_path / "r.toml"
        recipe.write_text(
            f'[distill]\nteacher = "{url}"\nteacher_model = "tiny-teacher"\nprompts = {PROMPTS}\nk = {K}\n'
            f'temperature = 0.0\nmax_new_tokens = 48\nconcurrency = 2\nbackoff_base = 0.01\n'
            f'out_dir = "{tmp_path / "d"}"\n[distill.task_args]\ndigits = 2\ntrain_size = 300\ntest_size = 20\n')
        cmd = [sys.executable, "-m", "r1kit.cli", "distill", "--config", str(recipe), "--sample-only"]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
        traces = tmp_path / "d" / "traces.jsonl"
        job = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not (traces.exists() and len(traces.read_bytes().splitlines()) >= 8):
            assert job.poll() is None and time.monotonic() < deadline, "the job ended before it could be killed"
            time.sleep(0.02)
        job.send_signal(signal.SIGKILL)
        job.wait()
        assert len(traces.read_bytes().splitlines()) < PROMPTS * K  # killed halfway
        with open(traces, "ab") as f:  # a kill mid-write leaves a cut line: the restart must drop it
            f.write(b'{"prompt_id": 11, "sample": 1, "prompt": "4')
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "dropping a half-written last line" in done.stderr and "resuming:" in done.stdout
    keys = [(r["prompt_id"], r["sample"]) for r in records(tmp_path / "d")]
    assert len(keys) == len(set(keys)) == PROMPTS * K
    assert as_set(tmp_path / "d") == as_set(clean_run)


def test_budget_stop_then_bad_key_lose_nothing(server, teacher_ckpt, clean_run, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with FaultProxy(server, key=KEY) as url:
        with pytest.raises(TeacherStopped, match="budget max_requests=5 spent this run; rerun the same command"):
            distill.run(cfg_for(tmp_path, url, teacher_ckpt, api_key_env=KEY_ENV, max_requests=5))
        assert len(records(tmp_path)) == 5
        with pytest.raises(TeacherStopped, match="budget max_total_tokens=100 spent this run"):
            distill.run(cfg_for(tmp_path, url, teacher_ckpt, api_key_env=KEY_ENV, max_total_tokens=100,
                                concurrency=1))
        assert len(records(tmp_path)) == 8  # 3 × ~35 tokens reach the budget; the run stops there
        monkeypatch.setenv(KEY_ENV, "sk-wrong")
        with pytest.raises(TeacherError, match=rf"refused the request \(401: Incorrect API key provided\): "
                                               rf"check the key in \${KEY_ENV}"):
            distill.run(cfg_for(tmp_path, url, teacher_ckpt, api_key_env=KEY_ENV))
        assert len(records(tmp_path)) == 8  # nothing written is lost
        monkeypatch.delenv(KEY_ENV)
        with pytest.raises(TeacherError, match=f"export {KEY_ENV}=<your key> and rerun"):
            distill.run(cfg_for(tmp_path, url, teacher_ckpt, api_key_env=KEY_ENV))
        monkeypatch.setenv(KEY_ENV, KEY)
        distill.run(cfg_for(tmp_path, url, teacher_ckpt, api_key_env=KEY_ENV))
    assert as_set(tmp_path) == as_set(clean_run)


# ---------------------------------------------------------------------------------------------
# Bad input: one line that says what to do
# ---------------------------------------------------------------------------------------------
def test_a_retry_after_of_an_hour_stops_the_run(server, teacher_ckpt, tmp_path):
    with FaultProxy(server, plan=("ok", "ok", "ok", "429"), retry_after="3600") as url:
        with pytest.raises(TeacherStopped, match="asks to wait 3600 s .*rerun the same command later"):
            distill.run(cfg_for(tmp_path, url, teacher_ckpt, concurrency=1))
    assert len(records(tmp_path)) == 3  # what came before the stop is kept


def test_two_jobs_on_one_directory_are_refused(server, teacher_ckpt, tmp_path):
    from r1kit.teachers import TraceLog
    with TraceLog(tmp_path / "traces.jsonl").exclusive():  # another job holds the directory
        with pytest.raises(TeacherError, match="another job is writing .*traces.jsonl: wait for it to finish"):
            distill.run(cfg_for(tmp_path, server + "/v1", teacher_ckpt))
    assert not (tmp_path / "traces.jsonl").exists()


def test_unreachable_url_is_one_line(tmp_path, teacher_ckpt, capsys):
    from r1kit.cli import main
    url = f"http://127.0.0.1:{free_port()}/v1"
    rc = main(["distill", "--sample-only", "--teacher", url, "--out", str(tmp_path), "--set", "distill.prompts=2",
               "--set", "distill.backoff_base=0.01"])
    err = capsys.readouterr().err
    assert rc == 3 and err.count("\n") == 1
    assert f"cannot reach teacher {url}" in err and "is the server running" in err


def test_unknown_model_names_the_served_ones(server, teacher_ckpt, tmp_path):
    with pytest.raises(TeacherError, match="has no model 'deepseek-reasoner' \\(it serves tiny-teacher\\): "
                                           "set distill.teacher_model"):
        distill.run(cfg_for(tmp_path, server + "/v1", teacher_ckpt, teacher_model="deepseek-reasoner"))


def test_a_server_without_reasoning_is_warned_about(server, teacher_ckpt, tmp_path, capsys):
    with FaultProxy(server, plan=("noreason",)) as url:
        with pytest.raises(NoTracesError, match="none of the .* verified-correct samples passed R1's filters "
                                                "\\(dropped: format"):
            distill.run(cfg_for(tmp_path, url, teacher_ckpt))
    out = capsys.readouterr().out
    assert "returned no reasoning in the first 8 samples" in out and "--reasoning-parser" in out
    recs = records(tmp_path)
    assert len(recs) == PROMPTS * K and all(r["reasoning_source"] == "none" for r in recs)  # all kept on disk
    stats = json.loads((tmp_path / "rejection.json").read_text())
    assert stats["dropped"]["format"] > 0 and stats["kept"] == 0


# ---------------------------------------------------------------------------------------------
# A peer server no one here wrote: llama.cpp's own (llama-cpp-python[server]) on r1kit's GGUF
# ---------------------------------------------------------------------------------------------
def test_llama_cpp_server_on_an_exported_gguf(teacher_ckpt, tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("sse_starlette")  # llama-cpp-python[server]'s own dependencies
    pytest.importorskip("pydantic_settings")
    from r1kit.export import export_checkpoint
    gguf = tmp_path / "tiny-teacher.gguf"
    export_checkpoint(teacher_ckpt, gguf, quant="F32")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
                             "--port", str(port), "--n_ctx", "256", "--n_threads", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "llama.cpp's server did not start"
            try:
                if httpx.get(url + "/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        # teacher_model "" → the server's only model (llama.cpp names it after the file)
        s = distill.run(cfg_for(tmp_path / "d", url, teacher_ckpt, teacher_model="", concurrency=2,
                                sample_only=False))
    finally:
        proc.terminate()
        proc.wait(30)
    recs = records(tmp_path / "d")
    assert len(recs) == PROMPTS * K and recs[0]["teacher"]["model"] == str(gguf)
    # no reasoning parser there: the template opened <think>, the reply closes it inside content
    assert all(r["reasoning_source"] == "think_tags" and r["reasoning"] for r in recs)
    assert s["rejection"]["kept"] >= 10 and s["student"]["steps"] == 3


# ---------------------------------------------------------------------------------------------
# On-policy distillation (GRPO stage, advantage = "teacher_logprob")
# ---------------------------------------------------------------------------------------------
def damaged_copy(ckpt: Path, out: Path, noise: float = 0.5, seed: int = 0) -> Path:
    """The teacher with Gaussian noise (noise × each matrix's std) in every matrix: a student that
    speaks the teacher's tokens but has lost about half its accuracy."""
    import r1kit
    from r1kit import checkpoint
    model, tok = checkpoint.load(ckpt)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=g) * noise * p.std())
    r1kit.save(model, tok, out)
    return out


def test_on_policy_distillation_pulls_the_student_to_the_teacher(teacher_ckpt, tmp_path):
    from r1kit.stages import grpo
    from r1kit.stages.grpo import GRPOConfig
    student = damaged_copy(teacher_ckpt, tmp_path / "student")
    cfg = GRPOConfig(base=str(student), out_dir=str(tmp_path / "opd"), task_args={**TASK_ARGS, "train_size": PROMPTS},
                     advantage="teacher_logprob", teacher=str(teacher_ckpt), steps=15, prompts_per_step=PROMPTS,
                     group_size=2, max_new_tokens=40, lr=3e-4, eval_every=1000, eval_problems=4, save_every=1000)
    grpo.run(cfg)
    m = [json.loads(x) for x in (tmp_path / "opd" / "metrics.jsonl").read_text().splitlines()]
    first, last = m[:3], m[-3:]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "reverse_kl") < 0.5 * mean(first, "reverse_kl")  # the student moved toward the teacher
    # … and answers more prompts correctly than before its first update (step 1 samples the untrained student)
    assert mean(last, "accuracy") > m[0]["accuracy"] + 0.15


def test_on_policy_distillation_needs_a_teacher_with_the_students_tokenizer(teacher_ckpt, tmp_path):
    import r1kit
    from r1kit.config import ConfigError
    from r1kit.models.llama import Llama, LlamaConfig
    from r1kit.stages.grpo import GRPOConfig, load_teacher
    from r1kit.tokenizer import build_bpe_tokenizer
    with pytest.raises(ConfigError, match="needs grpo.teacher: the checkpoint that scores the student's tokens"):
        GRPOConfig(advantage="teacher_logprob")
    other = build_bpe_tokenizer(["12+34=46", "hello world"], vocab_size=300)
    r1kit.save(Llama(LlamaConfig(vocab_size=other.vocab_size, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2)).init_weights(0), other, tmp_path / "t")
    from r1kit import checkpoint
    _, tok = checkpoint.load(teacher_ckpt)
    with pytest.raises(ConfigError, match="has another tokenizer than the policy"):
        load_teacher(GRPOConfig(advantage="teacher_logprob", teacher=str(tmp_path / "t")), tok)
    assert load_teacher(GRPOConfig(), tok) is None  # plain GRPO loads no teacher
