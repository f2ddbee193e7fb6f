"""LoRA adapters for both model families: wrap, merge, unmerge, switch off, by module name.

A LoRA linear computes  y = W x + b + (α / r) · B A dropout(x)  with the base W frozen and only
A (r, in) and B (out, r) trained (Hu et al. 2021). B starts at zero, so a fresh adapter changes
nothing; A starts like nn.Linear's own weights (Kaiming-uniform), as PEFT initialises it.

`LoRALinear` *is* an nn.Linear (same `weight`/`bias` names), so checkpoints, name maps and the
absorbed MLA path still find the base weight where they expect it; the adapter adds `lora_A` and
`lora_B`. Three switches, all exact:
    merge(model)      W ← W + s·BA, the adapter path is skipped (fast rollouts, export); the base
                      weight is kept aside meanwhile (memory: one copy of the adapted weights)
    unmerge(model)    the base weight restored bit for bit, back to training
    adapters_off(model)  a context in which every adapter is ignored: the frozen base, i.e. the
                      KL reference of a LoRA run with no second model in memory.

Targets are chosen by name: the short aliases q k v o gate up down (both families; for MLA q covers
wq / wq_a / wq_b and k, v cover wkv_a / wkv_b), r1kit's leaf names (wq, wkv_b, w1, …) or Hugging
Face's (q_proj, kv_b_proj, gate_proj, …). Experts and shared experts are matched through their
w1/w2/w3 leaves; the router (`ffn.gate`, not a Linear) and the output head never are.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from r1kit.models.kernels import Linear, linear

# alias → r1kit leaf names of nn.Linear modules
ALIASES = {
    "q": ("wq", "wq_a", "wq_b"), "k": ("wk", "wkv_a", "wkv_b"), "v": ("wv", "wkv_a", "wkv_b"),
    "o": ("wo",), "gate": ("w1",), "up": ("w3",), "down": ("w2",),
}
HF_LEAVES = {  # Hugging Face leaf name → r1kit leaf name
    "q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "q_a_proj": "wq_a", "q_b_proj": "wq_b",
    "kv_a_proj_with_mqa": "wkv_a", "kv_b_proj": "wkv_b", "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2",
}
LEAVES = {"wq", "wk", "wv", "wo", "wq_a", "wq_b", "wkv_a", "wkv_b", "w1", "w2", "w3", "eh_proj"}
DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class LoRALinear(Linear):
    """nn.Linear + a rank-r adapter. Build with `LoRALinear.wrap(linear, ...)`; the base is shared."""

    def __init__(self, in_features, out_features, bias=True, rank=16, alpha=32.0, dropout=0.0,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_adapter(rank, alpha, dropout)

    def _init_adapter(self, rank: int, alpha: float, dropout: float) -> None:
        if rank < 1:
            raise ValueError(f"lora rank must be ≥ 1, got {rank}")
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        dev = self.weight.device
        # adapters stay fp32 whatever the base dtype: their updates are small and bf16 would swallow them
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        self._base: torch.Tensor | None = None  # the unmerged weight while merged

    @classmethod
    def wrap(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> "LoRALinear":
        """A LoRALinear that shares `linear`'s weight and bias Parameters (no copy)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new._init_adapter(rank, alpha, dropout)
        return new

    def delta(self) -> torch.Tensor:
        """s·BA (out, in) in fp32: what merging adds to the base weight."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def effective_weight(self) -> torch.Tensor:
        """The weight this layer applies (base + adapter unless merged or switched off)."""
        if self.merged or self.disabled:
            return self.weight
        return (self.weight.float() + self.delta()).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias)  # the base, by the decode kernel when it applies
        if self.merged or self.disabled:
            return y
        a = self.lora_dropout(x).to(self.lora_A.dtype)
        return y + (F.linear(F.linear(a, self.lora_A), self.lora_B) * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W + s·BA. The base is kept aside and restored bit for bit by unmerge: subtracting s·BA
        again would leave rounding error in the frozen base after every rollout (bf16: a lot of it)."""
        if not self.merged:
            self._base = self.weight.detach().clone()
            self.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_(self._base)
            self._base = None
            self.merged = False

    def to_linear(self) -> Linear:
        """A plain Linear with the adapter folded in (for export and full checkpoints)."""
        lin = Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.effective_weight() if not self.merged else self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"


def resolve_targets(targets) -> set[str]:
    """Alias / r1kit / HF names → the set of r1kit leaf names to wrap (unknown names are an error)."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    out: set[str] = set()
    for t in targets:
        if t in ALIASES:
            out.update(ALIASES[t])
        elif t in HF_LEAVES:
            out.add(HF_LEAVES[t])
        elif t in LEAVES:
            out.add(t)
        else:
            known = sorted({*ALIASES, *LEAVES, *HF_LEAVES})
            raise ValueError(f"lora_targets: unknown module {t!r}; choose from {known}")
    return out


def apply_lora(model: nn.Module, rank: int = 16, alpha: float | None = None, dropout: float = 0.0,
               targets=DEFAULT_TARGETS, seed: int = 0, modules: set[str] | None = None) -> list[str]:
    """Wrap the targeted nn.Linear modules in place and freeze everything else.

    alpha defaults to 2·rank (DESIGN.md); `modules` restricts wrapping to these full module names
    (an adapter file that covers only some layers). Returns the wrapped names; raises when none match.
    """
    leaves = resolve_targets(targets)
    alpha = 2.0 * rank if alpha is None else alpha
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # adapter init is reproducible and independent of the caller's RNG stream
    try:
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                full = f"{name}.{child_name}" if name else child_name
                if child_name in leaves and type(child) in (nn.Linear, Linear) and (modules is None or full in modules):
                    setattr(module, child_name, LoRALinear.wrap(child, rank, alpha, dropout))
                    wrapped.append(full)
    finally:
        torch.random.set_rng_state(gen_state)
    if not wrapped:
        raise ValueError(f"lora_targets {sorted(leaves)} match no linear layer of {type(model).__name__}")
    model.lora = {"rank": rank, "alpha": alpha, "dropout": dropout, "targets": sorted(leaves)}
    return wrapped


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def merge(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.merge()


def unmerge(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.unmerge()


@contextlib.contextmanager
def merged(model: nn.Module):
    """Run the block with adapters folded into the weights (e.g. rollouts), then restore them."""
    was = {n: m.merged for n, m in lora_layers(model).items()}
    merge(model)
    try:
        yield model
    finally:
        for n, m in lora_layers(model).items():
            if not was[n]:
                m.unmerge()


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """The frozen base model: every adapter ignored inside the block (exact, merged or not)."""
    layers = lora_layers(model).values()
    saved = [(m, m.merged, m.disabled) for m in layers]
    for m in layers:
        m.unmerge()
        m.disabled = True
    try:
        yield model
    finally:
        for m, was_merged, was_disabled in saved:
            m.disabled = was_disabled
            if was_merged:
                m.merge()


def fold(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain Linear holding base + adapter (in place); returns model."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.to_linear())
    tie = getattr(model.config, "tie_word_embeddings", False)
    if tie and hasattr(model, "head"):
        model.head.weight = model.embed.weight
    if hasattr(model, "lora"):
        del model.lora
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{r1kit module name + '.lora_A' / '.lora_B': tensor} of every adapter."""
    out = {}
    for name, m in lora_layers(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach()
        out[f"{name}.lora_B"] = m.lora_B.detach()
    return out


def weight_of(linear: nn.Linear) -> torch.Tensor:
    """The weight a linear layer applies, adapter included: for code that reads weights directly
    (MLA's absorbed attention folds wkv_b into the query instead of calling it)."""
    return linear.effective_weight() if isinstance(linear, LoRALinear) else linear.weight
