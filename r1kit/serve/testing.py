"""Helpers for testing and benchmarking the server: a tiny reasoning model, a server in a thread.

`tiny_reasoning_checkpoint` trains a ~0.1M-parameter model for a few seconds until it answers
a fixed set of questions word for word with a `<think>` block and an answer, so a test knows
what greedy decoding must produce and sees separate reasoning without a real model. Its chat
template opens `<think>` in the prompt, as DeepSeek-R1's does.
"""
from __future__ import annotations

import math
import socket
import threading
import time

import torch

SUBJECTS = ["apple", "river", "tiger", "cloud", "stone", "piano", "lemon", "eagle", "candle", "forest",
            "rocket", "violin", "garden", "island", "mirror", "pepper", "silver", "winter", "yellow", "zebra",
            "banana", "castle", "dragon", "engine", "falcon", "guitar", "hammer", "jungle", "kettle", "ladder",
            "marble", "needle"]


def qa_pairs() -> list[tuple[str, str, str]]:
    """(question, reasoning, answer) for every subject."""
    return [(f"Tell me about {w}.", f"The user asks about {w}. Say it twice.", f"{w.capitalize()} {w}!")
            for w in SUBJECTS]


def memorise(model, ids, targets, steps: int, lr: float = 5e-3):
    """Fit a tiny model to one fixed batch (AdamW, cosine to zero), then switch it to eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # decaying to zero settles the memorised answers; a constant rate keeps kicking them loose
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))
    for _ in range(steps):
        loss = model(ids, targets=targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if hasattr(model, "after_optimizer_step"):  # MoE: the aux-loss-free bias update
            model.after_optimizer_step()
    return model.eval()


def tiny_reasoning_checkpoint(path, steps: int = 300, seed: int = 0, min_accuracy: float = 1.0,
                              family: str = "llama"):
    """Train and save a tiny model that answers `qa_pairs()` under greedy decoding → path.

    family "llama" (dense) or "deepseek" (DeepSeek-V3: MLA with the latent cache, MoE).

    Raises RuntimeError when training did not reach `min_accuracy` (exact greedy answers).
    """
    import r1kit
    from r1kit.tokenizer import build_bpe_tokenizer

    pairs = qa_pairs()
    replies = [f"<think>\n{r}\n</think>\n\n{a}" for _, r, a in pairs]
    tok = build_bpe_tokenizer([q for q, _, _ in pairs] + replies, vocab_size=320, force_think=True)
    model = _tiny_model(family, tok.vocab_size, seed)
    ids, targets = _training_batch(tok, pairs, replies)
    memorise(model, ids, targets, steps)
    got = r1kit.generate(model, tok, [q for q, _, _ in pairs], max_new_tokens=40, temperature=0)
    right = sum(g == reply.removeprefix("<think>\n") for g, reply in zip(got, replies))
    if right < min_accuracy * len(pairs):
        raise RuntimeError(f"tiny model learned only {right}/{len(pairs)} answers in {steps} steps")
    r1kit.save(model, tok, path)
    return path


def _tiny_model(family: str, vocab_size: int, seed: int):
    if family == "llama":
        from r1kit.models.llama import Llama, LlamaConfig
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
        return Llama(cfg).init_weights(seed=seed)
    if family == "deepseek":
        from r1kit.models.deepseek import DeepseekConfig, DeepseekV3
        cfg = DeepseekConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                             num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=32, qk_rope_head_dim=8,
                             qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                             first_k_dense_replace=1, num_nextn_predict_layers=0, max_position_embeddings=1024)
        return DeepseekV3(cfg).init_weights(seed)
    raise ValueError(f"family must be 'llama' or 'deepseek', got {family!r}")


def _training_batch(tok, pairs, replies):
    rows = []
    for (q, _, _), reply in zip(pairs, replies):
        ids, mask = tok.render_chat([{"role": "user", "content": q}, {"role": "assistant", "content": reply}])
        rows.append((ids, mask))
    width = max(len(i) for i, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, (i, m) in enumerate(rows):
        ids[r, : len(i)] = torch.tensor(i)
        # position t predicts token t+1; train only where that token is assistant output
        targets[r, : len(i) - 1] = torch.tensor([t if keep else -100 for t, keep in zip(i[1:], m[1:])])
    return ids, targets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """`with ServerThread(app) as url:` — uvicorn on a free localhost port in a daemon thread."""

    def __init__(self, app, port: int | None = None):
        import uvicorn
        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="r1kit-test-server")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
