"""
Memory state and its handling: the Transformer-XL cache, RMT memory tokens, and the segment loop
with its BPTT detach points. Small pure functions; each docstring says where gradients stop.

Shape legend: B batch, T segment tokens, M memory slots, P cached positions, C d_model.
A state is `State(cache, mem, kept)`: cache = list of L tensors (B, P, C) (layer inputs, Tr-XL) or
None, mem = (B, M, C) (RMT memory) or None, kept = list of L `Kept` (or None per layer), the keys,
values (and TRAMS scores, trams.py) of the cache's states, computed once, as each state entered,
or None (evaluation only: without a gradient the weights are fixed). It is passed into and
returned from `forward`, never kept in module buffers (DDP would overwrite buffers with rank 0's
copy), so a new stream starts empty.
"""
from collections import namedtuple

import torch
from torch.utils.checkpoint import checkpoint

State = namedtuple('State', 'cache mem kept', defaults=(None,))
# per layer, aligned with the cache: keys and values (B, H, P, D), TRAMS scores (B, H, P) or None
Kept = namedtuple('Kept', 'keys values scores')


def read_write(x, mem, arch):
    """RMT: [read M | tokens T | write M]; read and write slots get the same vectors, no
    projection. MT: [memory M | tokens T], no write block. Others: tokens alone.
    Returns h, n_read, n_write."""
    if arch == 'mt':
        return torch.cat([mem, x], 1), mem.size(1), 0                    # (B, M+T, C)
    if arch in ('rmt', 'xl_rmt'):
        return torch.cat([mem, x, mem], 1), mem.size(1), mem.size(1)     # (B, M+T+M, C)
    return x, 0, 0


def write_memory(out, n_write):
    """RMT: the next memory is the final layer's output at the write slots. Gradient flows through
    it into this segment; the segment loop below decides where it is cut."""
    return out[:, out.size(1) - n_write:] if n_write else None             # (B, M, C)


def update_cache(cache, hids, mem_len):
    """Tr-XL: FIFO of the last mem_len layer inputs per layer, old first. Always detached
    (stop-gradient): the cache never carries gradient, whatever bptt_depth is."""
    if mem_len <= 0:
        return None
    if cache is not None:
        hids = [torch.cat([c, h], 1) for c, h in zip(cache, hids)]       # (B, P+T, C)
    return [h[:, -mem_len:].detach() for h in hids]                       # (B, min(P+T, mem), C)


def update_kept(kept, P, n_read, T, mem_len):
    """Evaluation: each layer returns the keys and values (and TRAMS scores) of [cache P | block],
    block = [read | tokens T | write]. Keep the rows of the cache and of the T tokens (memory
    slots are never cached), cut like the cache to the last mem_len, so that row j still belongs
    to cache state j. Training returns None: there the cache is projected again every segment."""
    if mem_len <= 0 or all(k is None for k in kept):
        return None

    def rows(t):                                 # (B, H, P+S, .) -> (B, H, min(P+T, mem_len), .)
        if t is None:
            return None
        if n_read:                               # xl_rmt: leave out the read slots
            t = torch.cat([t[:, :, :P], t[:, :, P + n_read:]], 2)
        return t[:, :, :P + T][:, :, -mem_len:]

    cut = []
    for k in kept:
        if k is not None:                        # None: a layer that kept nothing
            k = Kept(*map(rows, k))
        cut.append(k)
    return cut


def move_state(state, device):
    """A state (or the plain (cache, mem) tuple a checkpoint holds) moved to device. `kept` is
    dropped: it exists only during evaluation, and attention recomputes it from the cache."""
    if state is None:
        return None
    cache, mem = state[:2]
    if cache is not None:
        cache = [c.to(device) for c in cache]
    if mem is not None:
        mem = mem.to(device)
    return State(cache, mem)


def detach(state):
    """Cut the gradient into earlier segments (a BPTT boundary)."""
    if state is None:
        return None
    return state._replace(mem=None if state.mem is None else state.mem.detach())


def run_segments(segment, x, state, targets, seg_len, bptt_depth, grad_checkpoint=False):
    """Run `segment` over consecutive chunks of seg_len tokens of x (B, T_all), carrying the state.

    BPTT-k (the paper's bptt_depth k): the memory is detached so that the gradient of a segment's
    loss reaches at most k earlier segments. The input state is always detached (it comes from an
    earlier optimizer step). Inside x, the segments form windows of k+1 segments aligned to the END
    (the answer of an algorithmic example sits at its end, so the last segment gets the full depth
    k); k = 0 detaches at every boundary, k = -1 never. An LM step passes exactly k+1 segments.
    Returns the concatenated per-segment outputs (B, T_all, ...) and the final state."""
    n = -(-x.size(1) // seg_len)
    outs = []
    for s in range(n):
        if s == 0 or (bptt_depth >= 0 and (n - s) % (bptt_depth + 1) == 0):
            state = detach(state)                                         # BPTT cut point
        chunk = slice(s * seg_len, (s + 1) * seg_len)
        args = x[:, chunk], state, None if targets is None else targets[:, chunk]
        # the last segment's backward comes right away: nothing to gain by recomputing it
        if grad_checkpoint and s < n - 1:
            out, state = checkpoint(segment, *args, use_reentrant=False)
        else:
            out, state = segment(*args)
        outs.append(out)
    return torch.cat(outs, 1), state
