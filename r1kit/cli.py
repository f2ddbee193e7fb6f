"""`r1kit <verb>`: one entry point, one module per verb, imported only when that verb runs.

Each verb module exposes `add_args(parser)` and `main(args) -> int | None`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# verb → (module, one-line help). A new stage adds one row.
VERBS = {
    "demo": ("r1kit.recipe", "run the whole tiny R1 recipe end to end (pretrain → GRPO → SFT → distill → eval)"),
    "generate": ("r1kit.cli_generate", "sample completions from a checkpoint"),
    "pretrain": ("r1kit.stages.pretrain", "pretrain a tiny base model from scratch on a synthetic task"),
    "sft": ("r1kit.stages.sft", "supervised fine-tuning on chat JSONL (cold start, distillation)"),
    "grpo": ("r1kit.stages.grpo", "R1-Zero style GRPO on verifiable rewards"),
    "distill": ("r1kit.stages.distill", "rejection-sample a teacher and fine-tune a small dense student"),
    "eval": ("r1kit.stages.evaluate", "pass@1 over k samples, cons@k, pass@k, greedy accuracy"),
    "merge": ("r1kit.merge", "fold a LoRA adapter (PEFT format) into its base as a full checkpoint"),
    "export": ("r1kit.export", "export a checkpoint to GGUF (F32/F16/Q8_0/Q4_K_M/Q5_K_M/Q6_K)"),
    "convert": ("r1kit.convert", "convert a GGUF file into a Hugging Face checkpoint directory"),
    "fit": ("r1kit.plan", "will it fit: file size, KV cache, GPU layers and a speed bound"),
    "serve": ("r1kit.serve.server", "OpenAI-compatible API server with a web chat"),
    "chat": ("r1kit.serve.chat", "chat with a checkpoint in the terminal"),
}


def top_help() -> str:
    lines = ["usage: r1kit VERB [options]   (r1kit VERB --help explains every option)", "", "verbs:"]
    lines += [f"  {v:10s} {h}" for v, (_, h) in VERBS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(top_help())
        return 0 if argv else 2
    verb = argv[0]
    if verb not in VERBS:
        import difflib
        near = difflib.get_close_matches(verb, list(VERBS), n=1)
        print(f"r1kit: unknown verb {verb!r}" + (f"; did you mean '{near[0]}'?" if near else ""), file=sys.stderr)
        print(top_help(), file=sys.stderr)
        return 2
    module_name, help_ = VERBS[verb]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:  # a package is missing: say which, and how to install it, in one line
        message = _missing_package(e, verb)
        if message is None:
            raise
        print(f"r1kit {verb}: {message}", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(prog=f"r1kit {verb}", description=help_)
    module.add_args(p)
    args = p.parse_args(argv[1:])
    from r1kit import dist
    from r1kit.common import MissingExtra
    from r1kit.config import ConfigError
    from r1kit.formats.hf import CheckpointError
    from r1kit.rewards import RewardError
    from r1kit.tokenizer import TokenizerError
    try:
        rc = module.main(args) or 0
        dist.shutdown()
        return rc
    except (ConfigError, CheckpointError, TokenizerError, RewardError, MissingExtra) as e:  # user errors: one line
        print(f"r1kit {verb}: error: {e}", file=sys.stderr)
        return 2
    except dist.DistError as e:  # torchrun: a peer missing or dead, a bad launch
        print(f"r1kit {verb}: error: {e}", file=sys.stderr)
        return dist.leave_after_peer_loss(3)
    except RuntimeError as e:  # a collective inside autograd (DDP/FSDP2) met a dead peer
        if not dist.is_peer_failure(e):
            raise
        print(f"r1kit {verb}: error: {dist.peer_lost(e, 'training')}", file=sys.stderr)
        return dist.leave_after_peer_loss(3)
    except ValueError as e:  # bad values met deeper (task files, sampling settings): still one line
        if not _raised_by_r1kit_check(e):
            raise
        print(f"r1kit {verb}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an optional package imported where it is first needed
        message = _missing_package(e, verb)
        if message is None:
            raise
        print(f"r1kit {verb}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nr1kit {verb}: interrupted", file=sys.stderr)
        return 130


def _missing_package(e: ImportError, verb: str) -> str | None:
    """One line for an import a user fixes by installing something; None for a bug in r1kit itself."""
    from r1kit.common import EXTRAS, MissingExtra, missing_extra
    if isinstance(e, MissingExtra):
        return str(e)
    top = (e.name or "").split(".")[0]
    if not top or top == "r1kit":
        return None
    if not isinstance(e, ModuleNotFoundError):  # e.g. "cannot import name": an old or broken install
        return f"{e} (reinstall or upgrade {top})"
    if top in EXTRAS:
        return str(missing_extra(top, f"r1kit {verb}"))
    return f"needs the Python package '{top}', a requirement of r1kit: reinstall r1kit (pip install r1kit)"


def _raised_by_r1kit_check(e: ValueError) -> bool:
    """A ValueError raised by r1kit's own input checks (not a bug deep in a library) → report it."""
    tb = e.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return "/r1kit/" in tb.tb_frame.f_code.co_filename.replace("\\", "/")


if __name__ == "__main__":
    sys.exit(main())
