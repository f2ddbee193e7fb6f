"""`r1kit <verb>`: one entry point, one module per verb, imported only when used.

Each verb module exposes `add_args(parser)` and `main(args) -> int | None`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# verb → (module, one-line help). A new stage adds one row.
VERBS = {
    "generate": ("r1kit.cli_generate", "sample completions from a checkpoint"),
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="r1kit", description="The DeepSeek-R1 recipe, small and fast.")
    sub = ap.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module, help_) in VERBS.items():
        p = sub.add_parser(verb, help=help_, description=help_)
        importlib.import_module(module).add_args(p)
        p.set_defaults(_module=module)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.verb:
        ap.print_help()
        return 2
    from r1kit.config import ConfigError
    from r1kit.models.hf import CheckpointError
    from r1kit.tokenizer import TokenizerError
    try:
        return importlib.import_module(args._module).main(args) or 0
    except (ConfigError, CheckpointError, TokenizerError) as e:  # user errors: one line, no traceback
        print(f"r1kit {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nr1kit {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
