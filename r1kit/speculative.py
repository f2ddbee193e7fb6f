"""MTP self-speculative greedy decoding: the model's own MTP depth 1 drafts, the main model verifies.

Per step, with t_n the newest token (chosen by the main model, so certainly right):
  draft   MTP depth 1 reads (h_{n-1}, t_n) and guesses d ≈ t_{n+1}
  verify  one main-model forward of [t_n, d] gives g1 = argmax at t_n (the true t_{n+1}) and, if
          d == g1, also g2 = argmax after d (the true t_{n+2}): two tokens for one forward
  reject  d != g1: keep g1 only and roll the main cache back one column (lens -= 1; the stale
          entry is masked out and overwritten next time)
Every emitted token is the main model's argmax given the true prefix, so the output equals plain
greedy decoding (engine with temperature 0) token for token; only the number of forwards changes.
The MTP block keeps its own latent cache, one column per (h_j, t_{j+1}) pair, always as long as the
main cache when a draft is made.

Batch size 1, depth-1 drafting (deeper MTP modules are trained but not used for drafting here).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from r1kit.models.kernels import decode_kernels


@dataclass
class SpecResult:
    tokens: list[int]  # generated ids (a stop token included when one ended generation)
    drafted: int  # drafts proposed
    accepted: int  # drafts the main model agreed with
    main_forwards: int  # main-model forwards, prefill included

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.drafted, 1)


@torch.no_grad()
def mtp_generate(model, prompt: list[int], max_new_tokens: int, stop_ids=()) -> SpecResult:
    """Greedy continuation of `prompt` with MTP drafts; output identical to plain greedy decoding."""
    if model.config.num_nextn_predict_layers < 1:
        raise ValueError("mtp_generate needs a model with num_nextn_predict_layers >= 1")
    if not prompt:
        raise ValueError("prompt is empty")
    was_training = model.training
    model.eval()
    try:
        with decode_kernels():  # as the engine decodes: greedy tokens equal to its own
            return _generate(model, prompt, max_new_tokens, frozenset(stop_ids))
    finally:
        model.train(was_training)


def _generate(model, prompt, max_new_tokens, stop_ids) -> SpecResult:
    dev = model.embed.weight.device
    max_len = len(prompt) + max_new_tokens + 2  # a verify step may look one token past the end
    cache, mtp_cache = model.new_cache(1, max_len), model.new_cache(1, max_len, mtp=True)
    ids = torch.tensor([prompt], device=dev)
    h = model.hidden(ids, cache)  # (1, n, d)
    out = [int(model.head(h[:, -1]).argmax(-1))]
    res = SpecResult(out, 0, 0, 1)
    # MTP pairs (h_j, t_{j+1}) for every prompt position: the last one drafts t_{n+1}
    pair_h, pair_t = h, torch.tensor([prompt[1:] + out], device=dev)
    while len(out) < max_new_tokens and out[-1] not in stop_ids:
        draft = int(model.head(model.mtp(1, pair_h, pair_t, mtp_cache)[:, -1]).argmax(-1))
        h = model.hidden(torch.tensor([[out[-1], draft]], device=dev), cache)  # (1, 2, d): verify
        g1, g2 = model.head(h).argmax(-1)[0].tolist()
        res.drafted, res.main_forwards = res.drafted + 1, res.main_forwards + 1
        if g1 == draft:
            res.accepted += 1
            new = [g1] if g1 in stop_ids else [g1, g2]
            pair_h, pair_t = h, torch.tensor([[g1, g2]], device=dev)
        else:
            cache.lens -= 1  # drop the rejected draft's column
            new = [g1]
            pair_h, pair_t = h[:, :1], torch.tensor([[g1]], device=dev)
        out.extend(new)
    res.tokens = out[:max_new_tokens]
    return res
