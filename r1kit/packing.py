"""Padding-free training forwards: variable-length documents as one flat sequence, attending in rows.

A batch of rollouts is ragged (prompts of different lengths, completions from a few tokens to
max_new_tokens), and GRPO's G samples of a prompt all begin with it. Right-padding every row to the
longest spends most of the forward and backward on padding and on copies of each prompt. Here the
token-wise layers (embedding, norms, projections, MLP: nearly all the FLOPs) run on one flat sequence
of real tokens — every completion once, every distinct prompt once — and only attention sees rows:
llama.AttnRows gathers each row's tokens (a prompt's keys and values copied to the head of every row
of its samples) and reads each token's output back from its own cell. In a row, several documents sit
side by side, each with its own RoPE positions (0, 1, … inside the document) and a block-diagonal
causal mask (llama.document_mask), so a token sees exactly the tokens it would see alone.

Rows have a capacity, the longest document of the batch: SDPA with a boolean mask computes the full
W × W scores of a row, so a row longer than the padded one would spend on attention what packing
saves. A row that holds one document needs no mask at all (plain causal).

The outputs that predict a scored suffix (a completion) are named by flat index in (documents, suffix
length) order, so per-token results come back in the layout the losses read — packing changes the
forward, never the maths after it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from r1kit.models.llama import AttnRows, document_mask


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Document indices → rows: longest first, each into the first row with room, so that every
    row's lengths sum to at most `capacity`. A document longer than `capacity` gets a row of its own.

    Deterministic (ties keep index order), so every forward of a step packs alike.

    >>> first_fit_decreasing([5, 3, 4, 2, 6], 8)
    [[4, 3], [0, 1], [2]]
    """
    if capacity < 1:
        raise ValueError(f"packing capacity must be ≥ 1, got {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []  # free tokens left in each row
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = lengths[i]
        at = next((r for r, free in enumerate(room) if free >= n), None)
        if at is None:
            rows.append([i])
            room.append(capacity - n)
        else:
            rows[at].append(i)
            room[at] -= n
    return rows


def shared_prompt_rows(prompts: list, prompt_len: list[int], suffix_len: list[int], capacity: int) -> list[list[int]]:
    """Rows for pack_documents(prefix=…) that write each prompt once for as many of its documents as fit.

    prompts: a hashable key per document (its prompt's tokens); the documents of one prompt go into segments
    (the prompt, then suffixes, first-fit-decreasing within capacity − prompt), and the segments into rows
    (first_fit_decreasing on their widths). Within a segment a document follows one with its prompt, which
    is what pack_documents shares. A row is at most `capacity` wide, as first_fit_decreasing's rows.

    >>> shared_prompt_rows(["a", "a", "a", "b"], [2, 2, 2, 3], [3, 2, 1, 2], capacity=6)
    [[0, 2], [3], [1]]
    >>> shared_prompt_rows(["a", "a"], [4, 4], [2, 1], capacity=3)  # a prompt past the capacity: no sharing
    [[0], [1]]
    """
    groups: dict = {}
    for i, key in enumerate(prompts):
        groups.setdefault(key, []).append(i)
    segments = []
    for docs in groups.values():
        room = capacity - prompt_len[docs[0]]
        if room < 1:  # the prompt alone fills a row: a segment per document, as first_fit_decreasing gives
            segments += [[i] for i in docs]
            continue
        for seg in first_fit_decreasing([suffix_len[i] for i in docs], room):
            segments.append([docs[j] for j in seg])
    widths = [prompt_len[seg[0]] + sum(suffix_len[i] for i in seg) for seg in segments]
    return [[i for s in row for i in segments[s]] for row in first_fit_decreasing(widths, capacity)]


@dataclass
class PackedBatch:
    """One padding-free forward's tokens, the rows their attention runs in, and where each scored token sits.

    The forward's input is one flat sequence, idx (1, N): every document's own tokens once, in the order
    of the rows, a prompt shared by several of its samples once for all of them (pack_documents' prefix),
    so the projections, norms and MLPs compute no padding and no prompt twice. Attention runs over rows
    (llama.AttnRows): row r holds the documents rows[r] side by side from column 0 — cell (r, c) is token
    rows.index[r, c], doc / branch say which document and branch of it (document_mask), padding is -1.
    n documents in all, numbered in the order of the rows: that order is `order`, indices into the
    caller's list. The scored tokens of document i are its last T_i tokens (a completion after its
    prompt), each predicted by the output at the token before it: those flat indices, in (n, T)
    row-major order over the M real scored tokens, are `logit_pos` (1, M) — the forward projects only
    them onto the vocabulary (the model's logit_pos), and its output is already in the losses' order.
    """
    idx: torch.Tensor  # (1, N) token ids
    positions: torch.Tensor  # (1, N) RoPE position of each token inside its document
    rows: AttnRows  # attention's rows of the N tokens: index (R, W), home (N,), mask (R, 1, W, W) or None
    doc: torch.Tensor  # (R, W) document number of each cell within its row; -1 = padding
    branch: torch.Tensor  # (R, W) 0, or k ≥ 1 for the k-th continuation of a shared prefix (document_mask)
    order: list[int]  # the caller's index of each of the n documents, in this layout's order
    token_index: list[list[int]]  # per document (in `order`), the flat index of each of its tokens
    logit_pos: torch.Tensor  # (1, M) flat index of the token whose output predicts each real scored token
    targets: torch.Tensor  # (n, T) the scored token ids; 0 at padding
    mask: torch.Tensor  # (n, T) float, 1 where a scored token exists

    @property
    def packed(self) -> bool:
        """Some row holds more than one document (its attention needs the block-diagonal mask)."""
        return self.rows.mask is not None

    def forward_kwargs(self) -> dict:
        """The model's keyword arguments besides idx: positions, the attention rows, logit_pos, token_mask."""
        return {"logit_pos": self.logit_pos, "token_mask": self.learn_mask(), "positions": self.positions,
                "attn_rows": self.rows}

    def learn_mask(self) -> torch.Tensor:
        """(1, N) bool: the tokens whose outputs predict a scored token (MoE load statistics count only these)."""
        out = torch.zeros(self.idx.shape, dtype=torch.bool, device=self.idx.device)
        out[0, self.logit_pos[0]] = True
        return out

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """The forward's output at logit_pos (1, M, …) → the real scored tokens' (M, …), in (n, T) row-major order."""
        return out[0]

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """values (M,) in gather's order → (n, T), exact zeros at padding (differentiable in values)."""
        return torch.zeros(self.mask.shape, dtype=values.dtype, device=values.device).masked_scatter(
            self.mask.bool(), values)

    @property
    def tokens(self) -> int:
        """Tokens the token-wise layers compute: N, no padding, each shared prompt once."""
        return self.idx.shape[1]


def pack_documents(docs: list[list[int]], scored: list[int], rows: list[list[int]], device=None,
                   prefix: list[int] | None = None) -> PackedBatch:
    """Documents (token lists), the length of each one's scored suffix, and rows of document indices
    (first_fit_decreasing, or one document per row for the padded layout) → the PackedBatch.

    The rows may name a subset of docs (one micro-batch); W is the longest row among them.

    prefix (per document, optional): the length of its prompt. The flat sequence holds each distinct prompt
    once (the same tokens: the same keys and values at positions 0…P−1 wherever it is read). In the rows, a
    document placed right after one with the same prompt shares that copy: only its own tokens are written
    there, as a continuation (document_mask's branch, positions from the prompt's length), so G samples of a
    prompt can sit in a row with the prompt once. Its scored tokens must lie past the prompt.

    >>> b = pack_documents([[1, 2, 3], [4, 5], [6, 7]], [1, 1, 1], [[0, 2], [1]])
    >>> b.idx.tolist(), b.positions.tolist(), b.rows.index.tolist(), b.doc.tolist()
    ([[1, 2, 3, 6, 7, 4, 5]], [[0, 1, 2, 0, 1, 0, 1]], [[0, 1, 2, 3, 4], [5, 6, 0, 0, 0]], [[0, 0, 0, 1, 1], [0, 0, -1, -1, -1]])
    >>> b.order, b.rows.home.tolist(), b.logit_pos.tolist(), b.targets.tolist()
    ([0, 2, 1], [0, 1, 2, 3, 4, 5, 6], [[1, 3, 5]], [[3], [7], [5]])
    >>> s = pack_documents([[1, 2, 3, 4], [1, 2, 5], [1, 2, 6]], [2, 1, 1], [[0, 1], [2]], prefix=[2, 2, 2])
    >>> s.idx.tolist(), s.positions.tolist(), s.rows.index.tolist(), s.branch.tolist(), s.logit_pos.tolist()
    ([[1, 2, 3, 4, 5, 6]], [[0, 1, 2, 3, 2, 2]], [[0, 1, 2, 3, 4], [0, 1, 5, 0, 0]], [[0, 0, 1, 1, 2], [0, 0, 1, 0, 0]], [[1, 2, 1, 1]])
    """
    shares = _sharing(docs, rows, prefix)
    order = [i for row in rows for i in row]
    widths = [sum(len(docs[i]) - (prefix[i] if s else 0) for i, s in zip(row, sh)) for row, sh in zip(rows, shares)]
    W, T = max(widths), max((scored[i] for i in order), default=0)
    R, n = len(rows), len(order)
    index = torch.zeros((R, W), dtype=torch.long)  # padding cells read token 0: their own "document", never read back
    doc = torch.full((R, W), -1, dtype=torch.long)
    branch = torch.zeros((R, W), dtype=torch.long)
    targets = torch.zeros((n, T), dtype=torch.long)
    mask = torch.zeros((n, T))
    flat = _FlatTokens()
    token_index, logit_pos, k = [], [], 0
    for r, (row, sh) in enumerate(zip(rows, shares)):
        at, d, b = 0, -1, 0  # next free column of the row; document number within it; branch of the last one
        for i, shared in zip(row, sh):
            seq, t, L = docs[i], scored[i], len(docs[i])
            P = prefix[i] if prefix is not None else 0
            if not 0 <= t < L or (shared and t > L - P):
                raise ValueError(f"document {i}: {t} scored tokens of {L}"
                                 + (f" after a shared prompt of {P}" if shared else " (its first token has no prediction)"))
            if shared:  # the row holds this prompt already, in the document before it: the rest only
                b, skip, where = b + 1, P, token_index[-1][:P]
            else:
                d, b, skip = d + 1, int(prefix is not None), 0
                where = flat.prompt(seq[:P])  # the prompt's tokens if the flat sequence has them already
            where = where + flat.write(seq, len(where), r * W + at - skip)
            own = L - skip
            index[r, at:at + own] = torch.tensor(where[skip:], dtype=torch.long)
            doc[r, at:at + own] = d
            if prefix is not None:  # the prompt is branch 0, each continuation its own branch
                branch[r, at:at + own] = b
                if not shared:
                    branch[r, at:at + P] = 0
                    flat.keep_prompt(seq[:P], where[:P])
            logit_pos.extend(where[L - t - 1:L - 1])  # scored token s is predicted by the output at token s − 1
            targets[k, :t] = torch.tensor(seq[L - t:], dtype=torch.long)
            mask[k, :t] = 1
            token_index.append(where)
            at, k = at + own, k + 1
    packed = any(len(row) > 1 for row in rows)
    attn = AttnRows(index.to(device), torch.tensor(flat.home, dtype=torch.long, device=device),
                    document_mask(doc, branch if prefix is not None else None).to(device) if packed else None)
    return PackedBatch(torch.tensor([flat.tokens], dtype=torch.long, device=device),
                       torch.tensor([flat.positions], dtype=torch.long, device=device), attn, doc.to(device),
                       branch.to(device), order, token_index,
                       torch.tensor([logit_pos], dtype=torch.long, device=device),
                       targets.to(device), mask.to(device))


class _FlatTokens:
    """pack_documents' flat sequence as it is written: tokens, their positions, each one's home cell, and the
    prompts written so far (their tokens → flat indices), so a prompt is written once."""

    def __init__(self):
        self.tokens, self.positions, self.home, self._prompts = [], [], [], {}

    def prompt(self, tokens: list[int]) -> list[int]:
        return list(self._prompts.get(tuple(tokens), [])) if tokens else []

    def keep_prompt(self, tokens: list[int], where: list[int]) -> None:
        if tokens:
            self._prompts.setdefault(tuple(tokens), where)

    def write(self, seq: list[int], start: int, cell0: int) -> list[int]:
        """Write seq[start:] (document positions start…), position p at cell cell0 + p → their flat indices."""
        f0 = len(self.tokens)
        self.tokens.extend(seq[start:])
        self.positions.extend(range(start, len(seq)))
        self.home.extend(range(cell0 + start, cell0 + len(seq)))
        return list(range(f0, f0 + len(seq) - start))


def _sharing(docs: list[list[int]], rows: list[list[int]], prefix: list[int] | None) -> list[list[bool]]:
    """Per row, per document: whether it shares the prompt of the document before it in the row."""
    if prefix is None:
        return [[False] * len(row) for row in rows]
    return [[a > 0 and prefix[i] == prefix[row[a - 1]] and docs[i][:prefix[i]] == docs[row[a - 1]][:prefix[i]]
             for a, i in enumerate(row)] for row in rows]
