"""Sequence parallelism made for alternating attention: one all-to-all where the blocks switch layouts.

The tokens of one clip, (B, T', N, D) with N = H'W' + 1 (the patches of a frame, then the joy token), are split
over the P ranks of a sequence-parallel group in one of two layouts:

    frames     (B, T'_r, N, D)   rank r holds whole frames:     spatial attention (over N) is local
    positions  (B, T', N_r, D)   rank r holds whole positions:  temporal attention (over T') is local

`layout(x, mode)` moves the tokens with one differentiable all-to-all, only when the mode changes; full attention
stays in the frames layout and exchanges heads inside attention (DeepSpeed-Ulysses). T' and N split as
torch.tensor_split splits, with uneven all-to-all pieces: nothing is padded or masked. `gather` assembles the whole
clip on every rank after the last block, so the head, the final layer and the loss run unchanged. docs/parallel.md
has the design, the joy token's and RoPE's place in it, and why the gradients need no rescaling.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol  # torch's differentiable collectives

# Which layout each attention mode needs: full attention works on whole frames and exchanges heads (Ulysses).
LAYOUT = {"spatial": "frames", "temporal": "positions", "full": "frames"}


def split_sizes(n: int, parts: int) -> list[int]:
    """Sizes of torch.tensor_split(range(n), parts): the first n % parts pieces one larger."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def all_to_all(
    x: torch.Tensor, group, scatter_dim: int, scatter_sizes: list[int], gather_dim: int, gather_sizes: list[int]
) -> torch.Tensor:
    """Differentiable uneven all-to-all: piece s of x along `scatter_dim` goes to rank s; from rank s this rank
    receives a piece whose `gather_dim` is gather_sizes[s], concatenated in rank order along `gather_dim`.

    The pieces travel flattened in one all_to_all_single with per-rank split sizes, so the sizes may differ."""
    rank = dist.get_rank(group)
    pieces = x.split(scatter_sizes, dim=scatter_dim)
    send = torch.cat([p.reshape(-1) for p in pieces])
    shape = list(x.shape)
    shape[scatter_dim] = scatter_sizes[rank]
    shapes = [shape[:gather_dim] + [g] + shape[gather_dim + 1 :] for g in gather_sizes]
    recv_sizes = [math.prod(s) for s in shapes]
    out = funcol.all_to_all_single_autograd(send, recv_sizes, [p.numel() for p in pieces], group)
    return torch.cat([p.view(s) for p, s in zip(out.split(recv_sizes), shapes)], dim=gather_dim)


class SequenceParallel:
    """The token layout of one clip over a sequence-parallel process group (see the module docstring).

    Not an nn.Module and not part of any state dict: the model holds one only inside `sharded(...)`."""

    def __init__(self, group):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.t_sizes = self.n_sizes = self.s_sizes = self.heads = None
        self.current = "frames"
        self.c_full = self.c_frames = None

    # --- entering and leaving ---------------------------------------------------------------------------
    def scatter(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """(B, T', N, D) whole clip -> this rank's frames (B, T'_r, N, D); c (B, 1 or T', D) kept for `condition`."""
        t, n = tokens.shape[1], tokens.shape[2]
        if t < self.size:
            raise ValueError(
                f"parallel.sequence={self.size} splits the clip's {t} latent frames over {self.size} "
                f"ranks: use at most {t} (a rank needs at least one frame)"
            )
        self.t_sizes, self.n_sizes, self.current = split_sizes(t, self.size), split_sizes(n, self.size), "frames"
        start = sum(self.t_sizes[: self.rank])
        self.c_full = c
        self.c_frames = c if c.shape[1] == 1 else c[:, start : start + self.t_sizes[self.rank]]
        return tokens[:, start : start + self.t_sizes[self.rank]]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's tokens in the current layout -> the whole (B, T', N, D), on every rank of the group."""
        x = self.layout(x, "spatial")  # whole frames (B, T'_r, N, D)
        # an all-to-all that sends this rank's frames to every rank: its backward sums the ranks' gradients
        return all_to_all(torch.cat([x] * self.size, dim=1), self.group, 1, [x.shape[1]] * self.size, 1, self.t_sizes)

    # --- between blocks ---------------------------------------------------------------------------------
    def layout(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """Tokens in the layout that a block of `mode` attends in: one all-to-all when it changes, else x."""
        want = LAYOUT[mode]
        if want == self.current:
            return x
        if want == "positions":  # (B, T'_r, N, D) -> (B, T', N_r, D)
            x = all_to_all(x, self.group, 2, self.n_sizes, 1, self.t_sizes)
        else:  # (B, T', N_r, D) -> (B, T'_r, N, D)
            x = all_to_all(x, self.group, 1, self.t_sizes, 2, self.n_sizes)
        self.current = want
        return x

    def condition(self, mode: str) -> torch.Tensor:
        """The block conditioning c for the layout of `mode`: per clip (B, 1, D), or this rank's frames' times."""
        return self.c_frames if LAYOUT[mode] == "frames" else self.c_full

    # --- Ulysses, inside full attention -----------------------------------------------------------------
    def heads_to_sequence(self, u: torch.Tensor) -> torch.Tensor:
        """(B, heads, T'_r N, d) -> (B, heads / P, T' N, d): this rank's heads over the whole clip."""
        n, self.heads = self.n_total, u.shape[1]  # heads need not divide P: the first ranks take one more
        return all_to_all(u, self.group, 1, split_sizes(self.heads, self.size), 2, [t * n for t in self.t_sizes])

    def sequence_to_heads(self, u: torch.Tensor) -> torch.Tensor:
        """(B, heads / P, T' N, d) -> (B, heads, T'_r N, d): back to all heads of this rank's frames."""
        n = self.n_total
        return all_to_all(u, self.group, 2, [t * n for t in self.t_sizes], 1, split_sizes(self.heads, self.size))

    @property
    def n_total(self) -> int:
        return sum(self.n_sizes)

    # --- a flat token sequence: a pretrained backbone's full attention (stale/models/pretrained) ------------
    # The family's (B, S, D) tokens (its patches, then the joy token) split along S as tensor_split splits; every
    # block attends over all tokens, so each attention exchanges heads (Ulysses) and nothing else moves.
    def scatter_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S, ...) the whole clip -> this rank's tokens (B, S_r, ...); fixes the split for the step."""
        s = tokens.shape[1]
        if s < self.size:
            raise ValueError(f"parallel.sequence={self.size} splits a clip of {s} tokens: use at most {s}")
        self.s_sizes = split_sizes(s, self.size)
        return self.slice_tokens(tokens)

    def slice_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share along dim 1 of a per-token tensor (RoPE tables, per-token times) of the split."""
        return x.narrow(1, sum(self.s_sizes[: self.rank]), self.s_sizes[self.rank])

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S_r, D) -> the whole (B, S, D) on every rank (its backward sums the ranks' gradients, as gather's)."""
        return all_to_all(torch.cat([x] * self.size, dim=1), self.group, 1, [x.shape[1]] * self.size, 1, self.s_sizes)

    def heads_to_tokens(self, u: torch.Tensor) -> torch.Tensor:
        """(B, S_r, heads, d) -> (B, S, heads_r, d): this rank's heads over every token (as heads_to_sequence)."""
        self.heads = u.shape[2]
        return all_to_all(u, self.group, 2, split_sizes(self.heads, self.size), 1, self.s_sizes)

    def tokens_to_heads(self, u: torch.Tensor) -> torch.Tensor:
        """(B, S, heads_r, d) -> (B, S_r, heads, d): back to all heads of this rank's tokens."""
        return all_to_all(u, self.group, 1, self.s_sizes, 2, split_sizes(self.heads, self.size))


@contextmanager
def sharded(model: torch.nn.Module, sp: SequenceParallel | None):
    """Run `model`'s forward passes inside this block sequence-parallel over `sp` (None: unchanged).

    Only the training step shards: validation, sampling and export run the whole clip on one rank as always."""
    if sp is None:
        yield
        return
    model.sequence_parallel = sp
    try:
        yield
    finally:
        model.sequence_parallel = None
