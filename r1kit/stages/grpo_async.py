"""GRPO's one-step off-policy mode (`async = true`): step s+1's rollouts are drawn while step s trains.

    step s:   take(s): copy the live weights θ_s into the snapshot, start drawing s+1 from it ──┐
              train step s on its batch (the live model moves to θ_{s+1} in place)        (overlap)
    step s+1: take(s+1): wait for the batch of s+1 (drawn from θ_s) ◄─────────────────────────┘

So the samples step s+1 trains on come from the weights *before* step s's update: one step stale.
The first step of a run draws its own batch in line (on-policy). π_old, which the clipped ratio is
formed against, is the trainer's own log-prob of the sampled tokens under the weights it is about to
update (recomputed, as PipelineRL and prime-rl do), not the sampler's; the staleness between the two
is then what `grpo.corrections` correct per token: TIS weights the loss by min(π_train/π_rollout, C),
IcePop drops tokens whose ratio leaves its band, against `Sample.logprobs` (the snapshot's log-probs).
The per-step mismatch (`mismatch_abs_logp`, `tis_clip_frac` / `icepop_mask_frac`) goes to metrics.jsonl.

The rollout thread generates from a snapshot copy of the policy (one more copy of the weights, no
optimizer state), with its own Engine; torch ops release the GIL, so decoding and the training forward,
backward and optimizer step run at once. Sampling is seeded by (seed, step, prompt) as in the
synchronous loop, so a run is deterministic given its seed. A checkpoint keeps the batch drawn ahead
(it came from weights the checkpoint no longer holds), so a resumed run trains on exactly the batch the
uninterrupted one would have; a run that stops (steps, time budget, target accuracy) drops it.
An error in the rollout thread is raised again in the trainer's thread when it takes that batch.

It pays only where the two threads get a core each (or a GPU stream each). On the 2-core CPU box, quiet
(bench/grpo_async.py, tiny R1-Zero, seeds 0-2): 1.12/1.15/0.85 s a step against 1.78/1.99/1.53 on-policy, the
same accuracy at the target; with another busy process on the box the two threads only took turns.
"""
from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from r1kit import dist
from r1kit.engine import Engine


@dataclass
class Drawn:
    """One step's rollouts and how they were drawn: sample_groups' result with its cost."""
    step: int  # the step they are for
    trained: list  # groups to train on (list of lists of Rollout)
    sampled: list  # every group sampled (dynamic sampling samples more than it trains)
    rounds: int  # generation rounds
    prompts: int  # the data cursor once they were drawn
    gen_seconds: float  # generation time (in the rollout thread when drawn ahead)
    wait_seconds: float  # how long the trainer waited for them (all of gen_seconds when drawn in line)
    lag: int = 0  # steps between the weights that sampled them and the ones that train on them


# draw(module, engine, step, prompts) → Drawn: step `step`'s rollouts from `module`, data cursor at `prompts`
DrawFn = Callable[[torch.nn.Module, Engine, int, int], Drawn]


class PolicyCopy:
    """A second copy of the policy to sample from, refreshed from the live model by sync(): async mode's
    snapshot (weights the trainer does not touch while a draw reads them) and rollouts in another dtype than
    the fp32 master weights (grpo.rollout_dtype: bf16 on a GPU, as vLLM-backed trainers sample).

    sync() copies, cast to the copy's dtype, what can change between steps: the trained parameters and the
    buffers (MoE router biases); a frozen parameter (a LoRA base) is copied once, here. A cast keeps what
    the model keeps in fp32 under .to(bf16) (router biases) and rebuilds RoPE's fp32 tables (reset_buffers).
    """

    def __init__(self, live: torch.nn.Module, dtype: torch.dtype | None = None):
        live = dist.unwrap(live)
        self.module = copy.deepcopy(live).requires_grad_(False)
        for p in self.module.parameters():
            p.grad = None
        if dtype is not None and dtype != live.embed.weight.dtype:
            self.module.to(dtype)
            self.module.reset_buffers()
        mine, buffers = dict(self.module.named_parameters()), dict(self.module.named_buffers())
        self.pairs = [(p, mine[n]) for n, p in live.named_parameters() if p.requires_grad]
        self.pairs += [(b, buffers[n]) for n, b in live.named_buffers() if n in buffers]
        self.cast = self.module.embed.weight.dtype != live.embed.weight.dtype

    @torch.no_grad()
    def sync(self) -> None:
        for live, mine in self.pairs:
            mine.copy_(live)


class OneStepAhead:
    """Draws step s+1's rollouts in a second thread, from a snapshot of the weights, while step s trains.

    take(step) returns that step's batch (waiting for the thread, or drawing it in line when none was
    drawn ahead), then snapshots the live weights and starts the next step's draw unless `step` is the
    last. pending() is the batch drawn ahead, for a checkpoint; `ready` seeds it when resuming.
    Use it as a context manager: leaving joins the thread, so no draw outlives the run.

    `threads`: intra-op threads of the rollout thread, set there (torch's setting is per thread: the
    trainer's stays as it is). run() passes the trainer's own count, so on a CPU the two threads together
    use twice torch.get_num_threads(): give each half the cores (OMP_NUM_THREADS or torch.set_num_threads).
    """

    def __init__(self, model, engine: Engine, draw: DrawFn, steps: int, threads: int, ready: Drawn | None = None,
                 dtype: torch.dtype | None = None):
        self.live, self.engine, self.draw, self.steps, self.threads = dist.unwrap(model), engine, draw, steps, threads
        self.copy = PolicyCopy(self.live, dtype)  # `dtype`: the rollouts' own (grpo.rollout_dtype), else the policy's
        self.snapshot = self.copy.module
        self.snap_engine = Engine(self.snapshot, engine.tok, max_batch=engine.max_batch,
                                  record_routing=engine.record_routing, static_decode=engine.static_decode)
        self.device = self.live.embed.weight.device
        self._ready, self._thread, self._result, self._error, self._copied = ready, None, None, None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def take(self, step: int, prompts: int) -> Drawn:
        """Step `step`'s batch (drawn ahead, or now from the live weights); starts drawing step + 1."""
        drawn = self._join()
        if drawn is None or drawn.step != step:  # first step, or nothing usable drawn ahead: on-policy, in line
            if self.copy.cast:  # rollouts in their own dtype from the first step on: sample the synced copy
                self.copy.sync()
                drawn = self.draw(self.snapshot, self.snap_engine, step, prompts)
            else:
                drawn = self.draw(self.live, self.engine, step, prompts)
        if step + 1 < self.steps:
            self._start(step + 1, drawn.prompts)
        return drawn

    def pending(self) -> Drawn | None:
        """The batch drawn ahead for the next step (waiting for it), to keep in a checkpoint."""
        self._ready = self._join()
        return self._ready

    def close(self) -> None:
        """Wait for a draw in flight and drop it (the run stops: no step will train on it)."""
        if self._thread is not None:
            self._thread.join()
        self._thread, self._ready, self._result, self._error = None, None, None, None

    # -- the rollout thread ---------------------------------------------------------------------------
    @torch.no_grad()
    def _start(self, step: int, prompts: int) -> None:
        self.copy.sync()  # θ_s, before step s's update: the trainer changes the live weights next
        self._copied = torch.cuda.Event() if self.device.type == "cuda" else None
        if self._copied is not None:
            self._copied.record()
        self._result = self._error = None
        self._thread = threading.Thread(target=self._work, args=(step, prompts), daemon=True,
                                        name=f"grpo-rollouts-step-{step + 1}")
        self._thread.start()

    def _work(self, step: int, prompts: int) -> None:
        try:
            torch.set_num_threads(self.threads)
            if self.device.type == "cuda":  # its own stream, so decoding and training kernels can overlap
                with torch.cuda.device(self.device), torch.cuda.stream(torch.cuda.Stream(self.device)) as s:
                    s.wait_event(self._copied)  # the snapshot copy, not the training kernels queued since
                    self._result = self.draw(self.snapshot, self.snap_engine, step, prompts)
                    s.synchronize()  # the next snapshot copy may overwrite what these kernels read
            else:
                self._result = self.draw(self.snapshot, self.snap_engine, step, prompts)
            self._result.lag = 1
        except BaseException as e:  # noqa: BLE001 — handed to the trainer's thread, which raises it
            self._error = e

    def _join(self) -> Drawn | None:
        """The batch drawn ahead (None if none); an error of the rollout thread is raised here."""
        if self._thread is None:
            ready, self._ready = self._ready, None
            return ready
        t0 = time.perf_counter()
        self._thread.join()
        self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error  # the same exception a synchronous draw would have raised, in the trainer's thread
        result, self._result = self._result, None
        result.wait_seconds = time.perf_counter() - t0  # the part of its generation training did not hide
        return result
