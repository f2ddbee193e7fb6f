"""Continuous batching in the server: 16 concurrent clients vs the same 16 requests in turn.

A small random-weight model (hidden 256, 4 layers) is saved to a temporary directory and served
by `r1kit serve` in a subprocess with one torch thread. Each request asks for exactly
`--new` tokens (ignore_eos, greedy), so both runs do the same work. Prints the wall time and
tokens/s of each run and the final line `batching_speedup=<sequential time / concurrent time>`.
    python bench/serve.py [--clients 16 --new 128 --threads 1 --stream]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

import r1kit
from r1kit.models.llama import Llama, LlamaConfig
from r1kit.serve.testing import free_port
from r1kit.tokenizer import build_bpe_tokenizer

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def make_checkpoint(path: Path) -> None:
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))]
    tok = build_bpe_tokenizer(corpus, vocab_size=512)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    r1kit.save(Llama(cfg).init_weights(seed=0), tok, path)


def start_server(ckpt: Path, port: int, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "r1kit.cli", "serve", str(ckpt), "--port", str(port), "--served-model-name", "bench",
           "--max-batch", str(args.clients), "--max-len", "512", "--threads", str(args.threads),
           "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


async def request(client: httpx.AsyncClient, i: int, args) -> int:
    """One chat completion → completion tokens received."""
    body = {"model": "bench", "messages": [{"role": "user", "content": " ".join(WORDS[i:i + 6])}],
            "max_tokens": args.new, "ignore_eos": True, "temperature": 0, "stream": args.stream}
    if not args.stream:
        res = await client.post("/v1/chat/completions", json=body)
        res.raise_for_status()
        return res.json()["usage"]["completion_tokens"]
    body["stream_options"] = {"include_usage": True}
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as res:
        res.raise_for_status()
        async for line in res.aiter_lines():
            if line.startswith("data: {") and '"usage":{' in line:
                tokens = int(line.split('"completion_tokens":')[1].split(",")[0])
    return tokens


async def run(url: str, args) -> tuple[float, float, int]:
    """→ (sequential seconds, concurrent seconds, tokens per run)."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await request(client, 0, args)  # warm-up: first-call allocations, kernel selection
        t0 = time.perf_counter()
        seq = [await request(client, i, args) for i in range(args.clients)]
        t1 = time.perf_counter()
        conc = await asyncio.gather(*(request(client, i, args) for i in range(args.clients)))
        t2 = time.perf_counter()
    if seq != list(conc) or sum(seq) != args.clients * args.new:
        raise SystemExit(f"token counts differ: sequential {seq}, concurrent {list(conc)}")
    return t1 - t0, t2 - t1, sum(seq)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--new", type=int, default=128, help="tokens per request")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    p.add_argument("--stream", action="store_true", help="stream the answers (server-sent events)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d) / "bench-model"
        make_checkpoint(ckpt)
        port = free_port()
        server = start_server(ckpt, port, args)
        try:
            seq, conc, tokens = asyncio.run(run(f"http://127.0.0.1:{port}", args))
        finally:
            server.terminate()
            server.wait(timeout=30)
    mode = "streamed" if args.stream else "non-streamed"
    print(f"{args.clients} {mode} requests × {args.new} tokens, server with {args.threads} torch thread(s)")
    print(f"one after another  {seq:7.2f} s  {tokens / seq:8.0f} tok/s")
    print(f"all at once        {conc:7.2f} s  {tokens / conc:8.0f} tok/s")
    print(f"batching_speedup={seq / conc:.2f}")


if __name__ == "__main__":
    main()
