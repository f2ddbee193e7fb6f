"""MoE routing replay: record the experts a forward routed each token to, replay them in a later one.

Mixture-of-experts RL is unstable when the forward that scores a rollout routes its tokens to other
experts than the forward that produced it: the ratio then measures a routing flip, not a policy
change. Replay records the expert ids of one forward and makes a later forward of the same tokens
use them (Zheng et al. 2025's "R2" records the trainer's own pre-update forward; Ma et al. 2025's
"R3" records the inference engine's). The gates hold the state (`deepseek.Gate.replay`); these
context managers set and clear it. Models without gates record nothing and replay nothing.
"""
from __future__ import annotations

import torch


def record_routing(model) -> "_RoutingContext":
    """Collect, per MoE gate (in `model.gates()` order), the (N, k) expert ids of the one forward run inside.

    Yields a list filled on exit: one tensor per gate, None for a gate that did not run (MTP in a
    logits-only forward).
    """
    return _RoutingContext(model, record=True)


def replay_routing(model, routes: list, replay: bool = True) -> "_RoutingContext":
    """Inside, each gate compares its top-k with `routes` (from `record_routing`) and, if `replay`, uses them.

    Yields a dict filled on exit: ``routing_disagreement``, the mean over gates of the share of
    (token, expert) picks this forward would make that are not among the recorded ones (0-d tensor).
    """
    return _RoutingContext(model, routes=routes, replay=replay)


class _RoutingContext:
    def __init__(self, model, record: bool = False, routes: list | None = None, replay: bool = False):
        self.gates = model.gates() if hasattr(model, "gates") else []
        self.record, self.routes, self.replay = record, routes, replay
        if not record and (routes is None or len(routes) != len(self.gates)):
            raise ValueError(f"routing replay: {len(routes or [])} recorded gates for a model with {len(self.gates)}")
        self.out: list | dict = [] if record else {}

    def __enter__(self):
        for i, g in enumerate(self.gates):
            if self.record:
                g.recorded = []
            elif self.routes[i] is not None:
                g.replay, g.replay_on, g.disagreement = self.routes[i], self.replay, None
        return self.out

    def __exit__(self, *exc):
        # each context clears only the state it set, so a record and a replay can nest
        if self.record:
            for g in self.gates:
                if len(g.recorded) > 1:
                    raise ValueError("record_routing: a gate ran more than once; record one forward at a time")
                self.out.append(g.recorded[0] if g.recorded else None)
                g.recorded = None
            return False
        seen = [g.disagreement for g in self.gates if g.disagreement is not None]
        for g in self.gates:
            g.replay, g.replay_on, g.disagreement = None, False, None
        if seen:
            self.out["routing_disagreement"] = torch.stack(seen).mean().detach()
        return False
