"""The distilled demo student through llama.cpp: held-out greedy accuracy per GGUF quantization.

Exports the checkpoint at F16, Q8_0, Q5_K_M and Q4_K_M, runs each file with llama-cpp-python
(greedy, one thread) on the same held-out problems, scores the answers with the task's own
verifier, and prints a table beside r1kit's own greedy accuracy on the fp32 checkpoint.
    python bench/gguf_student.py [CKPT] [--task arithmetic --problems 200]
CKPT defaults to the demo's student, runs/demo/distill/student/model.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import r1kit
from r1kit.export import export_checkpoint
from r1kit.rollout import greedy_accuracy, prompt_ids, score
from r1kit.tasks import get_task

QUANTS = ("F16", "Q8_0", "Q5_K_M", "Q4_K_M")


def llama_cpp_accuracy(path: Path, tok, task, problems, max_new_tokens: int) -> tuple[float, float]:
    """Greedy answers from llama.cpp for every problem → (accuracy, tokens/s)."""
    import llama_cpp
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=1, n_batch=256, verbose=False)
    stop, correct, n_tok, t0 = set(tok.stop_ids), 0, 0, time.perf_counter()
    for p in problems:
        out = []
        llm.reset()
        for t in llm.generate(prompt_ids(tok, p), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            if t in stop or len(out) >= max_new_tokens:
                break
            out.append(t)
        n_tok += len(out)
        correct += score(task, tok, p, tok.decode(out))[1]["accuracy"] >= 1.0
    return correct / len(problems), n_tok / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", nargs="?", default="runs/demo/distill/student/model")
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--task-args", default='{"require_think": false}', help="JSON")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = get_task(args.task, **json.loads(args.task_args))
    problems = task.problems("test", args.problems)
    model, tok = r1kit.load(args.ckpt)
    ours = greedy_accuracy(model, tok, task, problems, args.max_new_tokens)
    print(f"{'format':8s} {'tensor types':34s} {'size':>10s} {'accuracy':>9s} {'tok/s':>7s}")
    print(f"{'r1kit':8s} {'fp32 checkpoint':34s} {'':>10s} {ours:9.1%} {'':>7s}", flush=True)
    with tempfile.TemporaryDirectory() as d:
        for quant in QUANTS:
            res = export_checkpoint(args.ckpt, Path(d) / f"student-{quant}.gguf", quant)
            acc, tps = llama_cpp_accuracy(res.path, tok, task, problems, args.max_new_tokens)
            types = " ".join(f"{k}×{v}" for k, v in sorted(res.type_counts().items()))
            print(f"{quant:8s} {types:34s} {res.n_bytes / 1024:8.0f}Ki {acc:9.1%} {tps:7.0f}", flush=True)


if __name__ == "__main__":
    main()
