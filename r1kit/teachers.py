"""Teachers behind an OpenAI-compatible endpoint: a resumable, fault-tolerant trace job.

A teacher is any server speaking `POST {url}/chat/completions`: DeepSeek's API, vLLM, llama.cpp's
server, `r1kit serve`. Reasoning comes back in one of two shapes, and both are stored the same way:
    message.reasoning_content (DeepSeek, llama.cpp --reasoning-format, r1kit serve) or
    message.reasoning (vLLM ≥ 0.10's reasoning parser)          → reasoning, content as is
    <think>…</think> inside content (a server without a parser)  → split out of the content
The job asks for one sample per request (k requests per prompt), so a sample is the unit of work:
    - at most `concurrency` requests are in flight; workers pull the next sample only when one
      finishes (backpressure), and a 429 pauses every worker until its Retry-After has passed;
    - 429, 5xx, timeouts and dropped connections are retried with exponential backoff and full
      jitter (Retry-After honoured); 401/403, an unknown model and other 4xx stop the job at once;
    - every finished sample is one JSON line appended to traces.jsonl, flushed and fsynced before
      the next is taken, so a kill loses at most the requests in flight; a restart skips every
      (prompt_id, sample) already in the file and drops the half-written line a kill can leave.
The API key is read from the environment variable `api_key_env` names and only ever sent as the
Authorization header: it is not in the config, the traces, the summary or any message.
"""
from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})
QUOTA_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached", "insufficient_balance"})
MAX_RETRY_AFTER = 600.0  # a server asking for a longer wait is a quota stop, not a hiccup: end the run


class TeacherError(RuntimeError):
    """The teacher cannot be used as configured; the message is one line that says what to do."""


class TeacherStopped(TeacherError):
    """The job stopped early (budget spent, quota exhausted, samples still failing); what is done is kept."""


def is_remote(teacher: str) -> bool:
    """Whether `distill.teacher` names an endpoint rather than a checkpoint.

    >>> is_remote("http://127.0.0.1:8000/v1"), is_remote("runs/r1/teacher")
    (True, False)
    """
    return teacher.startswith(("http://", "https://"))


def public_url(url: str) -> str:
    """The URL without credentials, query or fragment: what may be written to traces and logs.

    >>> public_url("https://user:sk-secret@api.example.com/v1?key=sk-secret")
    'https://api.example.com/v1'
    """
    p = urlsplit(url)
    host = p.hostname or ""
    netloc = f"{host}:{p.port}" if p.port else host
    return urlunsplit((p.scheme, netloc, p.path.rstrip("/"), "", ""))


# ---------------------------------------------------------------------------------------------
# Pure pieces: reasoning split, Retry-After, backoff
# ---------------------------------------------------------------------------------------------
def split_reasoning(message: dict) -> tuple[str, str, str]:
    """A chat message → (reasoning, content, where the reasoning came from).

    >>> split_reasoning({"reasoning_content": "2+2=4", "content": "<answer>4</answer>"})
    ('2+2=4', '<answer>4</answer>', 'reasoning_content')
    >>> split_reasoning({"reasoning": "r", "content": "x"})
    ('r', 'x', 'reasoning')
    >>> split_reasoning({"content": "<think>\\n2+2=4\\n</think>\\n\\n<answer>4</answer>"})
    ('2+2=4', '<answer>4</answer>', 'think_tags')
    >>> split_reasoning({"content": "2+2=4</think><answer>4</answer>"})  # the template opened <think>
    ('2+2=4', '<answer>4</answer>', 'think_tags')
    >>> split_reasoning({"content": "<answer>4</answer>", "reasoning_content": None})
    ('', '<answer>4</answer>', 'none')
    """
    content = message.get("content") or ""
    for key in ("reasoning_content", "reasoning"):
        if (message.get(key) or "").strip():
            return message[key].strip(), content.strip(), key
    head, sep, tail = content.partition("</think>")
    if sep:
        return head.replace("<think>", "", 1).strip(), tail.strip(), "think_tags"
    return "", content.strip(), "none"


def joined_completion(reasoning: str, content: str) -> str:
    """Reasoning and answer as one R1 completion, the text verifiers and the student see.

    >>> joined_completion("2+2=4", "<answer>4</answer>")
    '<think>\\n2+2=4\\n</think>\\n<answer>4</answer>'
    >>> joined_completion("", "<answer>4</answer>")
    '<answer>4</answer>'
    """
    return f"<think>\n{reasoning}\n</think>\n{content}" if reasoning else content


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header (delta seconds or an HTTP date) → seconds to wait; None if absent or unreadable.

    >>> retry_after_seconds("3"), retry_after_seconds("0.25"), retry_after_seconds("soon")
    (3.0, 0.25, None)
    >>> retry_after_seconds("Thu, 01 Jan 1970 00:01:40 GMT", now=40.0)
    60.0
    """
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random,
                  retry_after: float | None = None) -> float:
    """Seconds before retry `attempt` (0-based): full jitter over base·2^attempt (capped), or the
    server's Retry-After plus a little jitter, so the waiting workers do not return in lockstep.

    >>> rng = random.Random(0)
    >>> all(0 <= backoff_delay(a, 1.0, 8.0, rng) <= min(8.0, 2 ** a) for a in range(6))
    True
    >>> 5.0 <= backoff_delay(0, 1.0, 8.0, rng, retry_after=5.0) <= 5.1
    True
    """
    if retry_after is not None:
        return retry_after + rng.uniform(0, 0.1 * base)
    return rng.uniform(0, min(cap, base * 2 ** attempt))


# ---------------------------------------------------------------------------------------------
# traces.jsonl: append-only, fsynced, repaired after a kill
# ---------------------------------------------------------------------------------------------
class TraceLog:
    """One JSON record per finished sample, keyed by (prompt_id, sample)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> dict[tuple[int, int], dict]:
        """The finished samples. A last line without its newline (a kill mid-write) is cut off the
        file; a broken line anywhere else is an error: that file was not written by this job."""
        if not self.path.exists():
            return {}
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            print(f"distill: {self.path}: dropping a half-written last line ({len(data) - end} bytes) "
                  "left by an interrupted run", file=sys.stderr)
            with open(self.path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        done: dict[tuple[int, int], dict] = {}
        for n, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                key = (int(rec["prompt_id"]), int(rec["sample"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise TeacherError(f"{self.path}:{n}: not a trace record (needs prompt_id and sample); "
                                   "use a fresh distill.out_dir or remove the file") from None
            done.setdefault(key, rec)
        return done

    @contextlib.contextmanager
    def exclusive(self):
        """Hold the file for one job: two jobs appending to one traces.jsonl would draw samples twice.
        The lock is the kernel's (flock), so a killed job never leaves a stale one behind."""
        import fcntl
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise TeacherError(f"another job is writing {self.path}: wait for it to finish, or use another "
                                   "distill.out_dir") from None
            yield self

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write: a kill leaves the line whole or cut, never interleaved
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------
@dataclass
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 96
    seed: int = 0

    def body(self, sample_seed: int) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens,
                "seed": sample_seed, "n": 1, "stream": False}


@dataclass
class RemoteTeacher:
    url: str
    model: str = ""  # "" → the server's only model
    api_key: str = field(default="", repr=False)
    api_key_env: str = ""
    timeout: float = 120.0
    retries: int = 8
    backoff_base: float = 1.0
    backoff_max: float = 60.0

    @classmethod
    def from_env(cls, url: str, api_key_env: str = "", **kw) -> "RemoteTeacher":
        key = ""
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise TeacherError(f"distill.api_key_env = {api_key_env!r}, but that environment variable is "
                                   f"empty or unset: export {api_key_env}=<your key> and rerun")
        return cls(url.rstrip("/"), api_key=key, api_key_env=api_key_env, **kw)

    @property
    def name(self) -> str:
        return public_url(self.url)

    def client(self, concurrency: int):
        import httpx
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(self.timeout, connect=min(10.0, self.timeout)),
                                 limits=httpx.Limits(max_connections=concurrency))

    def _refused(self, status: int, body) -> TeacherError:
        """A response no retry will change → the one-line error that says what to do."""
        msg = _error_message(body)
        if status in (401, 403):
            fix = (f"check the key in ${self.api_key_env}" if self.api_key_env
                   else "set distill.api_key_env to the environment variable that holds your key")
            return TeacherError(f"teacher {self.name} refused the request ({status}: {msg}): {fix}")
        if status == 404 and ("model" in msg.lower() or _error_code(body) == "model_not_found"):
            return TeacherError(f"teacher {self.name} has no model {self.model!r} ({msg}): "
                                "set distill.teacher_model to one it serves (GET /v1/models lists them)")
        if status == 404:
            return TeacherError(f"teacher {self.name}: no OpenAI API there (404 for /chat/completions): "
                                "the URL usually ends in /v1")
        if status in (402,) or _error_code(body) in QUOTA_CODES:
            return TeacherStopped(f"teacher {self.name}: quota exhausted ({status}: {msg}); finished traces "
                                  "are kept — rerun the same command once the quota is refilled")
        return TeacherError(f"teacher {self.name} rejected the request ({status}: {msg}): "
                            "check distill.teacher_model and the sampling settings")

    async def resolve_model(self, client, rng: random.Random) -> str:
        """Check the server is there and serves the model (GET /models) → the model id to send."""
        import httpx
        for attempt in range(self.retries + 1):
            try:
                r = await client.get(f"{self.url}/models")
            except httpx.HTTPError as e:
                if attempt < 1:  # one quick second try: a server still starting, a blip
                    await asyncio.sleep(min(0.5, self.backoff_base))
                    continue
                raise TeacherError(f"cannot reach teacher {self.name} ({type(e).__name__}: {e or 'no response'}): "
                                   "is the server running, and is distill.teacher its URL (ending in /v1)?") from None
            if r.status_code == 200:
                break
            if r.status_code not in RETRY_STATUS or _error_code(_json(r)) in QUOTA_CODES:
                raise self._refused(r.status_code, _json(r))
            wait = retry_after_seconds(r.headers.get("retry-after"))
            await asyncio.sleep(backoff_delay(attempt, self.backoff_base, self.backoff_max, rng, wait))
        else:
            raise TeacherError(f"teacher {self.name} kept answering {r.status_code} to GET /models "
                               f"after {self.retries} retries; try again later")
        ids = [m.get("id") for m in (_json(r) or {}).get("data", []) if isinstance(m, dict)]
        if not self.model:
            if len(ids) != 1:
                raise TeacherError(f"teacher {self.name} serves {len(ids)} models ({', '.join(map(str, ids[:8]))}): "
                                   "set distill.teacher_model to one of them")
            return ids[0]
        if ids and self.model not in ids:
            raise TeacherError(f"teacher {self.name} has no model {self.model!r} (it serves "
                               f"{', '.join(map(str, ids[:8]))}): set distill.teacher_model to one of them")
        return self.model

    async def chat(self, client, messages: list[dict], body: dict, run: "JobRun") -> dict:
        """One completion with retries → the response JSON. Fatal errors raise TeacherError."""
        import httpx
        payload = {"model": self.model, "messages": messages, **body}
        for attempt in range(self.retries + 1):
            await run.wait_turn()
            try:
                r = await client.post(f"{self.url}/chat/completions", json=payload)
            except (httpx.TimeoutException, httpx.TransportError) as e:
                kind, wait = ("timeout" if isinstance(e, httpx.TimeoutException) else "connection"), None
                detail = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    data = _json(r)
                    if isinstance(data, dict) and data.get("choices"):
                        return data
                    kind, wait, detail = "bad_response", None, f"200 without choices: {r.text[:120]!r}"
                elif r.status_code in RETRY_STATUS and _error_code(_json(r)) not in QUOTA_CODES:
                    kind, detail = str(r.status_code), f"{r.status_code}: {_error_message(_json(r))}"
                    wait = retry_after_seconds(r.headers.get("retry-after"))
                    if wait is not None and wait > MAX_RETRY_AFTER:
                        raise TeacherStopped(f"teacher {self.name} asks to wait {wait:.0f} s ({detail}); finished "
                                             "traces are kept — rerun the same command later")
                    if r.status_code == 429 and wait is not None:
                        run.pause(wait)  # the server asked everyone to slow down, not just this worker
                else:
                    raise self._refused(r.status_code, _json(r))
            run.note_error(kind, detail)
            if attempt == self.retries:
                break
            await asyncio.sleep(backoff_delay(attempt, self.backoff_base, self.backoff_max, run.rng, wait))
        raise _GaveUp(detail)


class _GaveUp(Exception):
    """One sample failed after every retry; the job goes on with the others."""


def _json(r):
    try:
        return r.json()
    except ValueError:
        return None


def _error_message(body) -> str:
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return str(err.get("message") or err.get("type") or err)[:200]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:200]
    return str(err or body or "no message")[:200]


def _error_code(body) -> str:
    err = body.get("error") if isinstance(body, dict) else None
    return str(err.get("code") or err.get("type") or "") if isinstance(err, dict) else ""


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One sample to draw: sample `sample` of prompt `prompt_id`."""
    prompt_id: int
    sample: int
    messages: list[dict]
    problem: object = None  # handed back to the judge


@dataclass
class Budget:
    max_requests: int = 0  # HTTP requests this run may make (retries included); 0 = no limit
    max_total_tokens: int = 0  # prompt + completion tokens this run may spend (from `usage`); 0 = no limit


class JobRun:
    """Shared state of one run: counters, the global 429 pause, the stop flag."""

    def __init__(self, total: int, budget: Budget, seed: int, jitter: float = 0.1):
        self.total, self.budget, self.rng, self.jitter = total, budget, random.Random(seed), jitter
        self.requests = self.done = self.tokens = 0
        self.errors: dict[str, int] = {}
        self.last_error = ""
        self.stop_reason: TeacherError | None = None
        self.failed: list[tuple[int, int]] = []
        self._pause_until = 0.0

    def pause(self, seconds: float) -> None:
        self._pause_until = max(self._pause_until, time.monotonic() + seconds)

    async def wait_turn(self) -> None:
        """Before every request: honour a global pause, then count the request against the budget."""
        paused = False
        while (delay := self._pause_until - time.monotonic()) > 0:
            await asyncio.sleep(delay)
            paused = True
        if paused:  # spread the paused workers out, or they all hit the server again at the same instant
            await asyncio.sleep(self.rng.uniform(0, self.jitter))
        if self.stop_reason is not None:
            raise _Stop()
        b = self.budget
        if (b.max_requests and self.requests >= b.max_requests) or \
                (b.max_total_tokens and self.tokens >= b.max_total_tokens):
            what = f"max_requests={b.max_requests}" if b.max_requests and self.requests >= b.max_requests \
                else f"max_total_tokens={b.max_total_tokens}"
            self.stop(TeacherStopped(f"budget {what} spent this run; rerun the same command to continue"))
            raise _Stop()
        self.requests += 1

    def stop(self, reason: TeacherError) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    def note_error(self, kind: str, detail: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.last_error = detail

    def info(self) -> str:
        errs = " ".join(f"{k}×{v}" for k, v in sorted(self.errors.items()))
        return f"{self.tokens:,} tok · {self.requests} req" + (f" · retried {errs}" if errs else "")


class _Stop(Exception):
    """Raised inside a worker when the run is stopping (budget, quota, a fatal error)."""


def run_jobs(teacher: RemoteTeacher, jobs: list[Job], log: TraceLog, sampling: Sampling, make_record,
             concurrency: int = 8, budget: Budget | None = None, done_before: int = 0) -> JobRun:
    """Draw every job's sample and append its record (`make_record(job, response, teacher) → dict`).

    Returns the run's counters. Raises TeacherError for a fatal error and TeacherStopped when the
    run ended early; in both cases every finished sample is already on disk.
    """
    run = JobRun(len(jobs), budget or Budget(), sampling.seed, jitter=0.25 * teacher.backoff_base)
    if jobs:
        asyncio.run(_run_async(teacher, jobs, log, sampling, make_record, max(1, concurrency), run, done_before))
    if run.stop_reason is not None:
        raise run.stop_reason
    if run.failed:
        raise TeacherStopped(f"{len(run.failed)} samples still failed after {teacher.retries} retries "
                             f"(last: {run.last_error}); {run.done} finished ones are saved — rerun to retry the rest")
    return run


async def _run_async(teacher, jobs, log, sampling, make_record, concurrency, run: JobRun, done_before: int):
    queue = iter(jobs)  # workers pull lazily: nothing is requested before a slot is free
    async with teacher.client(concurrency) as client:
        teacher.model = await teacher.resolve_model(client, run.rng)
        with _Progress(done_before + len(jobs), done_before) as bar:
            async def worker():
                for job in queue:
                    try:
                        data = await teacher.chat(client, job.messages, sampling.body(sample_seed(sampling.seed, job)), run)
                    except _Stop:
                        return
                    except _GaveUp:
                        run.failed.append((job.prompt_id, job.sample))
                        continue
                    except TeacherError as e:
                        run.stop(e)
                        return
                    rec = make_record(job, data, teacher)
                    log.append(rec)
                    run.done += 1
                    run.tokens += int((data.get("usage") or {}).get("total_tokens") or 0)
                    bar.advance(run.info())
            await asyncio.gather(*(worker() for _ in range(min(concurrency, len(jobs)))))


def sample_seed(seed: int, job: Job) -> int:
    """A seed per (prompt, sample): a retried or resumed sample asks for exactly the same draw.

    >>> sample_seed(0, Job(3, 1, [])) == sample_seed(0, Job(3, 1, [])) != sample_seed(0, Job(3, 2, []))
    True
    """
    return (seed * 1_000_003 + job.prompt_id * 1_009 + job.sample) % 2 ** 31


class _Progress:
    """A rich bar with rate, ETA, tokens and retry counts; one plain line per ~10% off a terminal."""

    def __init__(self, total: int, start: int):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                                   TimeRemainingColumn)
        self.tty, self.total, self.n, self.t0 = sys.stdout.isatty(), total, start, time.perf_counter()
        self.start, self.every = start, max(1, (total - start) // 10)
        self.bar = Progress(TextColumn("[bold]teacher"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                            TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
                            TextColumn("{task.fields[info]}"), disable=not self.tty)
        self.task = self.bar.add_task("teacher", total=total, completed=start, info="", rate="")

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def advance(self, info: str) -> None:
        self.n += 1
        rate = (self.n - self.start) / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.update(self.task, completed=self.n, info=info, rate=f"{rate:.1f} samples/s")
        if not self.tty and ((self.n - self.start) % self.every == 0 or self.n == self.total):
            eta = (self.total - self.n) / max(rate, 1e-9)
            print(f"teacher {self.n}/{self.total} {rate:.1f} samples/s ETA {eta:.0f}s {info}", flush=True)
