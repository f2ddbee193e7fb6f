"""torchrun entry for the distributed tests: `r1kit VERB ...`, with a fault injected from the environment.

R1KIT_TEST_FAULT = "kill:RANK:STEP"  rank RANK SIGKILLs itself at the start of step STEP (1-based)
                   "exit:RANK:STEP"  rank RANK exits (status 1) at the start of step STEP, mid-run
                   "stop:STEP"       every rank ends cleanly right after the checkpoint of step STEP
R1KIT_TEST_REWARD = "length"        GRPO rewards 1 for completions whose length is a multiple of 3: a
                                     deterministic reward that varies within groups even for a random model
The stages' step functions are looked up at call time, so wrapping them here is enough.
"""
import os
import signal
import sys

import torch

torch.set_num_threads(1)


def length_reward(cfg, rollouts):
    return torch.tensor([float(len(r.sample.tokens) % 3 == 0) for r in rollouts])


def _inject(fault: str) -> None:
    from r1kit import checkpoint
    from r1kit.stages import grpo, pretrain, sft
    kind, *args = fault.split(":")
    if kind in ("kill", "exit"):
        rank, at = int(args[0]), int(args[1])

        def wrap(fn, step_arg):
            def step(*a, **kw):
                if int(os.environ["RANK"]) == rank and a[step_arg] + 1 == at:
                    if kind == "kill":
                        os.kill(os.getpid(), signal.SIGKILL)
                    os._exit(1)
                return fn(*a, **kw)
            return step
        pretrain._train_step = wrap(pretrain._train_step, 6)
        sft._train_step = wrap(sft._train_step, 6)
        grpo.train_step = wrap(grpo.train_step, 1)
    elif kind == "stop":
        at, save = int(args[0]), checkpoint.save

        def save_then_stop(*a, **kw):
            out = save(*a, **kw)
            if (kw.get("trainer_state") or {}).get("state", {}).get("step") == at:
                from r1kit import dist
                dist.shutdown()
                sys.exit(0)
            return out
        checkpoint.save = save_then_stop
    else:
        raise SystemExit(f"R1KIT_TEST_FAULT={fault!r}: unknown fault")


if __name__ == "__main__":
    if os.environ.get("R1KIT_TEST_REWARD") == "length":
        from r1kit.stages import grpo
        grpo.rewards_of = length_reward
    if os.environ.get("R1KIT_TEST_FAULT"):
        _inject(os.environ["R1KIT_TEST_FAULT"])
    from r1kit.cli import main
    sys.exit(main(sys.argv[1:]))
