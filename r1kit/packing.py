"""Padding-free training forwards: variable-length documents packed into rows.

A batch of rollouts is ragged (prompts of different lengths, completions from a few tokens to
max_new_tokens). Right-padding every row to the longest spends most of the forward and backward on
padding; packing puts several documents side by side in one row instead, each with its own RoPE
positions (0, 1, … inside the document) and a block-diagonal causal mask (llama.document_mask), so a
token sees exactly the tokens it would see alone and the row computes what the separate documents
would.

Rows have a capacity, the longest document of the batch: SDPA with a boolean mask computes the full
W × W scores of a row, so a row longer than the padded one would spend on attention what packing
saves in the projections. A row that holds one document needs no mask at all; a batch whose rows all
hold one document is the right-padded batch, run as a plain causal forward.

Where each document's scored suffix (a completion) sits is kept as flat indices, so per-token results
come back in the (documents, suffix length) layout the losses read — packing changes the forward,
never the maths after it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from r1kit.models.llama import document_mask


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
    """Documents laid out in rows for one forward, and where each document's scored tokens sit.

    Row r holds the documents rows[r] side by side from column 0; n documents in all, numbered in the
    order of the rows (row 0's documents first): that order is `order`, indices into the caller's list.
    The scored tokens of document i are its last T_i tokens (a completion after its prompt), each
    predicted by the output one column before it. Those columns, row by row, are `logit_pos` (R, K):
    the forward projects only them onto the vocabulary (the model's logit_pos). The M real scored
    tokens, in (n, T) row-major order, are the entries `pick` of that (R, K) output flattened.
    """
    idx: torch.Tensor  # (R, W) token ids, pad_id after each row's last document
    positions: torch.Tensor  # (R, W) RoPE position of each token inside its document (padding: its own run)
    doc: torch.Tensor  # (R, W) document number of each token within its row; -1 = padding
    branch: torch.Tensor  # (R, W) 0, or k ≥ 1 for the k-th continuation of a shared prefix (document_mask)
    packed: bool  # some row holds more than one document: the forward needs positions and the mask
    order: list[int]  # the caller's index of each of the n documents, in this layout's order
    place: list[tuple[int, int]]  # (row, first column of the document's own tokens: its suffix when shared)
    logit_pos: torch.Tensor  # (R, K) columns whose outputs predict a scored token; 0 after a row's last
    pick: torch.Tensor  # (M,) flat index into R·K of each real scored token, in (n, T) row-major order
    targets: torch.Tensor  # (n, T) the scored token ids; 0 at padding
    mask: torch.Tensor  # (n, T) float, 1 where a scored token exists

    def forward_kwargs(self) -> dict:
        """The model's keyword arguments for this layout: logit_pos, plus positions and the block-diagonal
        mask when a row holds several documents (none else: plain causal, the padded forward)."""
        kw = {"logit_pos": self.logit_pos, "token_mask": self.learn_mask()}
        if self.packed:
            kw.update(positions=self.positions, attn_mask=document_mask(self.doc, self.branch))  # (R, W), (R, 1, W, W)
        return kw

    def learn_mask(self) -> torch.Tensor:
        """(R, W) bool: the columns whose outputs predict a scored token (MoE load statistics count only these)."""
        K = self.logit_pos.shape[1]
        out = torch.zeros(self.idx.shape, dtype=torch.bool, device=self.idx.device)
        out[self.pick // K, self.logit_pos.flatten()[self.pick]] = True
        return out

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """The forward's output at logit_pos (R, K, …) → the real scored tokens' (M, …), in (n, T) row-major order."""
        return out.flatten(0, 1)[self.pick]

    def row_targets(self) -> torch.Tensor:
        """(R, K): the scored token each logit_pos output predicts, -100 (ignored) in unused slots."""
        out = torch.full((self.logit_pos.numel(),), -100, dtype=torch.long, device=self.idx.device)
        out[self.pick] = self.targets[self.mask.bool()]
        return out.view(self.logit_pos.shape)

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """values (M,) in gather's order → (n, T), exact zeros at padding (differentiable in values)."""
        return torch.zeros(self.mask.shape, dtype=values.dtype, device=values.device).masked_scatter(
            self.mask.bool(), values)

    @property
    def tokens(self) -> int:
        """Tokens the forward computes, padding included: R × W."""
        return self.idx.numel()


def pack_documents(docs: list[list[int]], scored: list[int], rows: list[list[int]], pad_id: int,
                   device=None, prefix: list[int] | None = None) -> PackedBatch:
    """Documents (token lists), the length of each one's scored suffix, and rows of document indices
    (first_fit_decreasing, or one document per row for the padded layout) → the PackedBatch.

    The rows may name a subset of docs (one micro-batch); W is the longest row among them.

    prefix (per document, optional): the length of its prompt. A document placed right after one with the
    same prompt (same tokens) in a row shares that copy: only its own tokens are written, as a continuation
    (document_mask's branch, positions from the prompt's length), so G samples of a prompt can sit in a row
    with the prompt once. Its scored tokens must lie past the prompt.

    >>> b = pack_documents([[1, 2, 3], [4, 5], [6, 7]], [1, 1, 1], [[0, 2], [1]], pad_id=0)
    >>> b.idx.tolist(), b.positions.tolist(), b.doc.tolist()
    ([[1, 2, 3, 6, 7], [4, 5, 0, 0, 0]], [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]], [[0, 0, 0, 1, 1], [0, 0, -1, -1, -1]])
    >>> b.order, b.logit_pos.tolist(), b.pick.tolist(), b.targets.tolist()
    ([0, 2, 1], [[1, 3], [0, 0]], [0, 1, 2], [[3], [7], [5]])
    >>> s = pack_documents([[1, 2, 3, 4], [1, 2, 5, 6]], [2, 2], [[0, 1]], pad_id=0, prefix=[2, 2])
    >>> s.idx.tolist(), s.positions.tolist(), s.branch.tolist(), s.logit_pos.tolist(), s.targets.tolist()
    ([[1, 2, 3, 4, 5, 6]], [[0, 1, 2, 3, 2, 3]], [[0, 0, 1, 1, 2, 2]], [[1, 2, 1, 4]], [[3, 4], [5, 6]])
    """
    shares = _sharing(docs, rows, prefix)
    order = [i for row in rows for i in row]
    widths = [sum(len(docs[i]) - (prefix[i] if s else 0) for i, s in zip(row, sh)) for row, sh in zip(rows, shares)]
    W, T = max(widths), max((scored[i] for i in order), default=0)
    K = max(sum(scored[i] for i in row) for row in rows)
    R, n = len(rows), len(order)
    idx = torch.full((R, W), pad_id, dtype=torch.long)
    positions = torch.zeros((R, W), dtype=torch.long)
    doc = torch.full((R, W), -1, dtype=torch.long)  # padding is a "document" of its own: it sees only itself
    branch = torch.zeros((R, W), dtype=torch.long)
    logit_pos = torch.zeros((R, K), dtype=torch.long)
    targets = torch.zeros((n, T), dtype=torch.long)
    mask = torch.zeros((n, T))
    place, pick, k = [], [], 0
    for r, (row, sh) in enumerate(zip(rows, shares)):
        at = j = 0  # next free column of the row; next free slot of its logit_pos
        d = -1  # document number within the row (a shared prompt's continuations keep its number)
        b = prompt_end = 0  # branch of the last document written; column after its segment's prompt
        for i, shared in zip(row, sh):
            seq, t, L = docs[i], scored[i], len(docs[i])
            if not 0 <= t < L or (shared and t > L - prefix[i]):
                raise ValueError(f"document {i}: {t} scored tokens of {L}"
                                 + (f" after a shared prompt of {prefix[i]}" if shared else " (its first token has no prediction)"))
            skip = prefix[i] if shared else 0  # tokens already in the row: the shared prompt
            if shared:
                b += 1
            else:
                d, b, prompt_end = d + 1, (1 if prefix is not None else 0), at + (prefix[i] if prefix is not None else 0)
            own = seq[skip:]
            idx[r, at:at + len(own)] = torch.tensor(own, dtype=torch.long)
            positions[r, at:at + len(own)] = torch.arange(skip, L)
            doc[r, at:at + len(own)] = d
            if prefix is not None:  # the prompt is branch 0, each continuation its own branch
                branch[r, at:at + len(own)] = b
                if not shared:
                    branch[r, at:prompt_end] = 0
            # scored token s is predicted by the output at token s − 1: this document's own column, or for the
            # first token after a shared prompt, the prompt's last one
            cols = [at + s - 1 - skip if s - 1 >= skip else prompt_end - skip + s - 1 for s in range(L - t, L)]
            logit_pos[r, j:j + t] = torch.tensor(cols, dtype=torch.long)
            pick.extend(range(r * K + j, r * K + j + t))
            targets[k, :t] = torch.tensor(seq[L - t:], dtype=torch.long)
            mask[k, :t] = 1
            place.append((r, at))
            at, j, k = at + len(own), j + t, k + 1
        positions[r, at:] = torch.arange(W - at)
    out = [t.to(device) for t in (idx, positions, doc, branch, logit_pos, torch.tensor(pick, dtype=torch.long),
                                  targets, mask)]
    return PackedBatch(*out[:4], any(len(row) > 1 for row in rows), order, place, *out[4:])


def _sharing(docs: list[list[int]], rows: list[list[int]], prefix: list[int] | None) -> list[list[bool]]:
    """Per row, per document: whether it shares the prompt of the document before it in the row."""
    if prefix is None:
        return [[False] * len(row) for row in rows]
    return [[a > 0 and prefix[i] == prefix[row[a - 1]] and docs[i][:prefix[i]] == docs[row[a - 1]][:prefix[i]]
             for a, i in enumerate(row)] for row in rows]
