"""`r1kit chat CKPT`: talk to a checkpoint (or a .gguf file) in the terminal.

The reasoning streams dimmed, the answer in normal text. The conversation is kept between
turns (answers only: DeepSeek advises not to send reasoning back); `/reset` forgets it,
`/exit` (or Ctrl-D) quits, Ctrl-C stops the current reply.
"""
from __future__ import annotations

import sys

from r1kit.engine import SamplingParams
from r1kit.serve.backends import Admission, BackendError, load_backend
from r1kit.serve.text import ChoiceText

HELP = "commands: /reset (forget the conversation), /exit (quit); Ctrl-C stops a reply"


def add_args(p) -> None:
    p.add_argument("ckpt", help="checkpoint directory (r1kit or Hugging Face format) or a .gguf file "
                                "(needs llama-cpp-python)")
    p.add_argument("--system", default=None, help="a system message to start every conversation with")
    p.add_argument("--max-tokens", type=int, default=1024, help="most tokens per reply")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: the checkpoint's generation_config, else 0.6)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: as for temperature, else 0.95)")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    p.add_argument("--max-len", type=int, default=None, help="context length (default: the model's, at most 4096)")
    p.add_argument("--hide-reasoning", action="store_true", help="do not print the <think> part")
    p.add_argument("--device", default="auto", help="auto (cuda → mps → cpu), cpu, cuda …")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the model")


def main(args) -> int:
    from rich.console import Console
    console = Console(highlight=False)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    try:
        backend = load_backend(args.ckpt, max_batch=1, max_len=args.max_len, device=args.device,
                               dtype=args.dtype, threads=args.threads)
    except BackendError as e:
        print(f"r1kit chat: error: {e}", file=sys.stderr)
        return 2
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    console.print(f"[bold]{backend.name}[/] · context {backend.context_len} tokens · {HELP}", style="dim")
    while True:
        try:
            line = console.input("[bold green]you ›[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = list(start)
            console.print("(conversation cleared)", style="dim")
            continue
        if line.startswith("/"):
            console.print(f"unknown command {line.split()[0]}; {HELP}", style="yellow")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        answer = reply(backend, messages, args, console)
        if answer is None:  # did not fit: forget the question, keep the conversation usable
            messages.pop()
        else:
            messages.append({"role": "assistant", "content": answer})


def _params(backend, args, room: int) -> SamplingParams:
    d = backend.defaults
    return SamplingParams(max_new_tokens=min(args.max_tokens, room), seed=args.seed,
                          temperature=args.temperature if args.temperature is not None else d.get("temperature", 0.6),
                          top_p=args.top_p if args.top_p is not None else d.get("top_p", 0.95))


def reply(backend, messages: list[dict], args, console) -> str | None:
    """Stream one answer to the console → the answer text (None when the prompt does not fit)."""
    prompt, in_reasoning = backend.prompt(messages)
    room = backend.context_len - len(prompt)
    if room < 1:
        console.print(f"the conversation ({len(prompt)} tokens) fills the {backend.context_len}-token context; "
                      "/reset to start over", style="red")
        return None
    text = ChoiceText(backend.decode, (), in_reasoning)
    shown = {"reasoning": False, "content": False}
    console.print("[bold blue]r1 ›[/] ", end="")
    try:
        events = backend.tick([Admission(("chat",), prompt, _params(backend, args, room))], [])
        finished = None
        while finished is None:
            for _, token, reason in events:
                _show(text.push(token), shown, console, args.hide_reasoning)
                finished = reason
            if finished is None:
                events = backend.tick([], [])
        _show(text.finish(), shown, console, args.hide_reasoning)
        if finished == "length":
            console.print("\n[reply cut at the token limit]", style="yellow", end="")
    except KeyboardInterrupt:
        backend.reset()  # the step may have been interrupted halfway: start from a clean state
        _show(text.finish(), shown, console, args.hide_reasoning)
        console.print("\n[stopped]", style="yellow", end="")
    console.print()
    return text.content


def _show(delta, shown: dict, console, hide_reasoning: bool) -> None:
    if delta.reasoning and not hide_reasoning:
        shown["reasoning"] = True
        console.print(delta.reasoning, style="dim", end="", markup=False, soft_wrap=True)
    if delta.content:
        if shown["reasoning"] and not shown["content"]:
            console.print("\n")  # a blank line between the thinking and the answer
        shown["content"] = True
        console.print(delta.content, end="", markup=False, soft_wrap=True)
