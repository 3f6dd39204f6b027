"""
Every architecture of the RMT paper behind one flag, `arch`:
  baseline  Transformer with relative positions, each segment alone
  mt        Memory Transformer: learned memory tokens prepended to every segment
  xl        Transformer-XL: cache of the previous layer inputs (Dai et al. 2019)
  rmt       Recurrent Memory Transformer: [read mem | tokens | write mem] (Bulatov et al. 2022)
  xl_rmt    Transformer-XL + RMT: both
Memory handling and the segment loop live in memory.py.

Read in this order: the config, the mask (`build_mask`), positions (`sinusoid`, `rel_shift`),
attention (`attention`, `RelAttention`, and `keep_all`, the step TRAMS overrides), the block, the
model (`MemTransformer.segment`: one segment, memory in and out). Below a banner at the end: the
pieces that exist only for speed, each tested equal to the plain formula it replaces.

Shape legend: B batch, T segment tokens, M memory slots, P cached positions (xl), S = M+T+M
positions in the block, K = P+S keys, R = K+S relative distances, L layers, H heads,
D head dim, C d_model, V vocab.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import memory

ARCHS = ('baseline', 'mt', 'xl', 'rmt', 'xl_rmt')


# ----------------------------------------------------------------------------- config
@dataclass
class ModelConfig:
    arch: str = 'rmt'          # baseline | mt | xl | rmt | xl_rmt
    vocab_size: int = 12       # V; set from the task's data
    n_layer: int = 2           # L: blocks (layers)
    n_head: int = 4            # H: attention heads per layer
    d_model: int = 64          # C: model width; even (sinusoidal positions: sin, cos pairs)
    d_head: int = 16           # D: head width; n_head * d_head need not equal d_model
    d_inner: int = 128         # FFN hidden size
    dropout: float = 0.0       # on embeddings, positional embeddings, attention output, FFN
    dropatt: float = 0.0       # on attention probabilities
    seg_len: int = 16          # tokens per segment (T); evaluation may use another
    mem_len: int = 12          # xl, xl_rmt: cached layer inputs per layer (P); eval may differ
    n_mem_tokens: int = 12     # mt, rmt, xl_rmt: memory slots (M)
    bptt_depth: int = -1       # rmt: segments the gradient reaches back (0 = none, -1 = all)
    clamp_len: int = 0         # > 0: cap |distance| in the positional term
    cutoffs: tuple = ()        # adaptive softmax cluster starts (wt103); () = full softmax
    aux_mem_loss: float = 0.0  # rmt, xl_rmt: weight of the auxiliary memory loss (paper: 0.01)
    grad_checkpoint: bool = False  # recompute each segment in the backward pass: less memory

    def __post_init__(self):
        check_limits(self, MODEL_LIMITS)
        # the arch decides which memory knobs exist; unused ones are zeroed so configs stay true
        if self.arch not in ('xl', 'xl_rmt'):
            self.mem_len = 0
        elif self.mem_len < 1:
            raise ValueError(f'--arch {self.arch} needs --mem_len >= 1')
        if self.arch in ('baseline', 'xl'):
            self.n_mem_tokens = 0
        elif self.n_mem_tokens < 1:
            raise ValueError(f'--arch {self.arch} needs --n_mem_tokens >= 1')
        if self.aux_mem_loss and self.arch not in ('rmt', 'xl_rmt'):
            raise ValueError('--aux_mem_loss needs --arch rmt or xl_rmt')
        if self.d_model % 2:
            raise ValueError(f'--d_model must be even (sinusoidal positions take sin and cos '
                             f'pairs), got {self.d_model}')
        if list(self.cutoffs) != sorted(set(self.cutoffs)) or min(self.cutoffs, default=1) < 1:
            raise ValueError(f'--cutoffs must be increasing positive ids, got {self.cutoffs}')


# the allowed values of each field that has a fixed limit (the memory knobs depend on the arch:
# checked above); the same table form serves TrainConfig (train.py) and trams.py
MODEL_LIMITS = dict(arch=ARCHS, vocab_size='>= 1', n_layer='>= 1', n_head='>= 1',
                    d_model='>= 1', d_head='>= 1', d_inner='>= 1', dropout='[0, 1)',
                    dropatt='[0, 1)', seg_len='>= 1', bptt_depth='>= -1', clamp_len='>= 0',
                    aux_mem_loss='>= 0')


def check_limits(cfg, limits):
    """Raise ValueError, in one line naming the flag, for the first field of cfg outside its
    limit: a tuple of allowed values, or for a number '>= a', '> a', '[a, b)' or '[a, b]' (a
    finite number within; nan fails every comparison, so it is refused too)."""
    for name, limit in limits.items():
        value = getattr(cfg, name)
        if isinstance(limit, tuple):
            if value not in limit:
                raise ValueError(f"unknown {name} '{value}': use one of "
                                 f"{', '.join(map(str, limit))}")
            continue
        if limit.startswith('['):                    # [low, high) or [low, high]
            low, high = (_number(b) for b in limit[1:-1].split(','))
            below = value <= high if limit.endswith(']') else value < high
            ok, text = low <= value and below, f'in {limit}'
        else:                                        # '>= low' or '> low'
            op, low = limit.split()
            ok, text = value > _number(low) or (op == '>=' and value == _number(low)), limit
        if not (ok and math.isfinite(value)):
            raise ValueError(f'--{name} must be {text}, got {value}')


def _number(text):  # an int where the text is one (exact for 63-bit seeds), else a float
    text = text.strip()
    if text.lstrip('-').isdigit():
        return int(text)
    return float(text)


# ----------------------------------------------------------------------------- the mask
def build_mask(P, n_read, T, n_write, device=None):
    """Boolean (S, K) mask, True = may attend, for keys [cache P | read | tokens T | write] and
    queries [read | tokens | write]. Built once per forward, shared by layers. For P=2, 2 read
    slots, T=3, 2 write slots (rows = queries, columns = keys c c r r t t t w w):
        read   1 1 1 1 0 0 0 0 0    read memory: each other (and the cache, in xl_rmt)
        read   1 1 1 1 0 0 0 0 0
        token  1 1 1 1 1 0 0 0 0    tokens: cache, read memory, earlier tokens, itself;
        token  1 1 1 1 1 1 0 0 0      never the write memory
        token  1 1 1 1 1 1 1 0 0
        write  1 1 1 1 1 1 1 1 1    write memory: everything
        write  1 1 1 1 1 1 1 1 1
    MT has no write rows; XL and the baseline have no memory rows: plain causal."""
    S = n_read + T + n_write
    q = torch.arange(S, device=device)[:, None] + P
    k = torch.arange(P + S, device=device)[None, :]
    mask = k <= q                                      # causal: tokens see cache, read, the past
    mask[:n_read, P:P + n_read] = True                 # RMT/MT: read memory is bidirectional
    mask[n_read + T:] = True                           # RMT: write memory goes last, sees all
    return mask                                        # (S, K)


# ----------------------------------------------------------------------------- positions
def sinusoid(pos, C):
    """Sinusoidal embedding (Vaswani et al.) of (signed) distances pos (R,) -> (R, C)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, C, 2, device=pos.device, dtype=torch.float) / C))
    x = pos[:, None].float() * inv_freq[None]
    return torch.cat([x.sin(), x.cos()], -1)


def rel_shift(x, K):
    """Positional scores over distances K-1 ... -S (descending) to scores at the true signed
    distance d(i, j) = (K-S) + i - j of query i and key j: out[..., i, j] = x[..., i, S-1-i+j].
    Example, S=2 queries, K=3 keys (one cached): the columns of x hold distances 2 1 0 -1 -2;
    query 0 (position 1) needs distances 1 0 -1 to keys 0 1 2, columns 1..3 of its row; query 1
    needs 2 1 0, columns 0..2. Flattening (S, R) and re-viewing it with rows one shorter shifts
    row i left by S-1-i: that is the whole trick. Pure views (Tr-XL's shift trick); valid because
    the table holds every distance, negative ones included (the original's table stops at 0,
    which leaves garbage where d < 0). x (..., S, R = K+S) contiguous -> (..., S, K)."""
    *lead, S, R = x.shape
    x = x.reshape(-1, S * R)[:, S - 1:S - 1 + S * (R - 1)]
    return x.view(*lead, S, R - 1)[..., :K]


# ----------------------------------------------------------------------------- attention
def attention(q, k, val, pos_scores, mask, dropatt=0.0):
    """softmax(q·kᵀ/sqrt(D) + pos_scores, masked)·val: q (B, H, S, D), k and val (B, H, K, D),
    the positional term pos_scores (B, H, S, K) already scaled, mask (S, K) True = may attend.
    This plain formula is what CPU training runs; where SDPA is the faster kernel (CUDA, CPU fp32
    inference: `use_sdpa`, below the banner at the end), SDPA runs instead (tested equal)."""
    if use_sdpa(q):
        return sdpa_attention(q, k, val, pos_scores, mask, dropatt)
    B, H, S, D = q.shape
    # one (S, K) score matrix per (head, batch) pair, in head-major order: pos_scores is a view of
    # a head-first tensor (RelAttention.position_scores), so (H*B, S, K) costs no copy of it
    q, k, val, pos_scores = (t.transpose(0, 1).flatten(0, 1) for t in (q, k, val, pos_scores))
    a = torch.baddbmm(pos_scores, q, k.transpose(1, 2), alpha=1 / math.sqrt(D))  # (H*B, S, K)
    # masked in place on `a` itself, not on a 4-d view of it: autograd's backward of an in-place
    # op on a view copies the whole score tensor five times
    a = a.masked_fill_(~mask, float('-inf')).softmax(-1)
    a = dropout(a, dropatt)
    return (a @ val).view(H, B, S, D).transpose(0, 1)                            # (B, H, S, D)


def keep_all(attn, q_u, keys, values, pos_scores, mask, kept):
    """The narrowing step of plain Transformer-XL: attend to every key, each at its true distance.
    TRAMS (trams.attach) replaces this step, and only this one, by its memory selection.
      q_u (B, H, S, D) the queries plus the content bias u (TRAMS scores with them)
      keys, values (B, H, K, D) of [cache | block]; pos_scores (B, H, S, K); mask (S, K)
      kept: memory.Kept of the cache (evaluation) or None, with the scores TRAMS kept
    -> keys, values, pos_scores, mask to attend, and what the next segment keeps of this one's
    keys: memory.Kept of all K in evaluation (no gradient: the weights are fixed), else None."""
    new_kept = None
    if not torch.is_grad_enabled():
        new_kept = memory.Kept(keys, values, None)
    return keys, values, pos_scores, mask, new_kept


class RelAttention(nn.Module):
    """Tr-XL relative attention (Dai et al. 2019, §3.3): score(i, j) = [(q_i+u)·k_j +
    (q_i+v)·W_R r_{d(i,j)}] / sqrt(D); keys and values also cover the cache. The positional term
    and the mask enter `attention` as an additive bias."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.H, self.D = cfg.n_head, cfg.d_head
        self.layer = layer        # its index in the stack: TRAMS can select in some layers only
        self.q = nn.Linear(cfg.d_model, cfg.n_head * cfg.d_head, bias=False)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.n_head * cfg.d_head, bias=False)
        self.r = nn.Linear(cfg.d_model, cfg.n_head * cfg.d_head, bias=False)   # W_R
        self.o = nn.Linear(cfg.n_head * cfg.d_head, cfg.d_model, bias=False)
        self.drop = Dropout(cfg.dropout)
        self.dropatt = cfg.dropatt
        # which keys to attend: every one (plain XL); trams.attach installs TRAMS's selection
        self.narrow = keep_all

    def forward(self, h, *, cache, kept, pos, mask, u, v):
        """One layer's attention over [cache | h].
          h      (B, S, C)  the block [read | tokens | write]
          cache  (B, P, C)  this layer's XL cache (its inputs of earlier segments), or None
          kept   memory.Kept of the cache's keys and values (evaluation only), or None
          pos    (R, C)     embeddings of every distance a query has to a key, K-1 down to -S
          mask   (S, K)     True = may attend
          u, v   (H, D)     content and position biases of the paper, shared by all layers
        -> output (B, S, C), and memory.Kept of [cache | h] in evaluation (None in training)."""
        B, S, _ = h.shape
        q = self.q(h).view(B, S, self.H, self.D).transpose(1, 2)                 # (B, H, S, D)
        u, v = u.to(q.dtype)[:, None], v.to(q.dtype)[:, None]   # (H, 1, D); bf16 stays bf16
        keys, values = self.keys_values(h, cache, kept)                          # (B, H, K, D)
        pos_scores = self.position_scores(q, v, pos)                             # (H, B, S, R)
        pos_scores = RelShift.apply(pos_scores, keys.size(2)).transpose(0, 1)    # (B, H, S, K)
        q_u = q + u
        keys, values, pos_scores, mask, new_kept = self.narrow(
            self, q_u, keys, values, pos_scores, mask, kept)
        y = attention(q_u, keys, values, pos_scores, mask, self.dropatt if self.training else 0.0)
        return self.drop(self.o(y.transpose(1, 2).reshape(B, S, -1))), new_kept  # (B, S, C)

    def position_scores(self, q, v, pos):
        """(q_i+v)·W_R r / sqrt(D) for every query and distance of pos (R, C): (H, B, S, R), head
        first. W_R r is shared by the batch, so this is one matmul per head over all B*S queries,
        (H, B*S, D) x (H, D, R), rather than B*H small ones."""
        B, H, S, D = q.shape
        r = self.r(pos).view(-1, H, D)                                           # (R, H, D)
        q_v = ((q + v) / math.sqrt(D)).transpose(0, 1).reshape(H, B * S, D)     # (H, B*S, D)
        return (q_v @ r.permute(1, 2, 0)).view(H, B, S, -1)                      # (H, B, S, R)

    def keys_values(self, h, cache, kept):
        """Keys and values (B, H, P+S, D) of [cache | h]. Evaluation (no gradient) reuses `kept`,
        the keys and values each cache state got when it entered, and projects only h. Training
        projects the whole cache again with the current weights, as the original does: the
        weights change every step, and the gradient reaches W_K and W_V through the cache too."""
        B, H, D = h.size(0), self.H, self.D
        reuse = kept is not None and not torch.is_grad_enabled()
        if reuse and kept.keys.size(2) != cache.size(1):
            raise RuntimeError(f'{kept.keys.size(2)} kept keys for a cache of {cache.size(1)}: '
                               'state out of step')
        inputs = h
        if cache is not None and not reuse:
            inputs = torch.cat([cache, h], 1)                                    # (B, P+S, C)
        k, val = self.kv(inputs).view(B, -1, 2, H, D).permute(2, 0, 3, 1, 4)     # (B, H, ., D)
        if reuse:
            k, val = torch.cat([kept.keys, k], 2), torch.cat([kept.values, val], 2)  # (B,H,K,D)
        return k, val


class Block(nn.Module):
    """Post-LN residual block of the papers: LN(h + attn(h)), then LN(h + FFN(h)), ReLU FFN."""

    def __init__(self, cfg, layer):
        super().__init__()
        self.attn = RelAttention(cfg, layer)
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.ff = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_inner), nn.ReLU(),
                                Dropout(cfg.dropout), nn.Linear(cfg.d_inner, cfg.d_model),
                                Dropout(cfg.dropout))
        self.ln2 = nn.LayerNorm(cfg.d_model)

    def forward(self, h, **attn_inputs):
        """h (B, S, C); attn_inputs: RelAttention.forward's cache, kept, pos, mask, u, v."""
        y, kept = self.attn(h, **attn_inputs)
        h = self.ln1(h + y)
        return self.ln2(h + self.ff(h)), kept


# ----------------------------------------------------------------------------- the model
class MemTransformer(nn.Module):
    """Decoder-only Transformer with relative positions and optional XL cache / memory tokens.
    forward(idx, state, targets) -> (log-probs (B, T, V) or per-token NLL (B, T), new state).
    Deviation: the initial RMT memory is N(0, 1e-3^2) rows, not identical N(0, 1) ones (see
    __init__: zeros explode at depth, large rows leave the memory without content)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C, H, D = cfg.d_model, cfg.n_head, cfg.d_head
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)
        self.drop = Dropout(cfg.dropout)
        self.u = nn.Parameter(torch.zeros(H, D))       # content bias, shared by all layers
        self.v = nn.Parameter(torch.zeros(H, D))       # position bias, shared by all layers
        # RMT/MT: learned initial memory (M, C), filled in below
        self.mem_init = None
        if cfg.n_mem_tokens:
            self.mem_init = nn.Parameter(torch.zeros(cfg.n_mem_tokens, C))
        self.blocks = nn.ModuleList(Block(cfg, l) for l in range(cfg.n_layer))
        if cfg.cutoffs:  # word-level LM: adaptive softmax (Grave et al. 2017), untied (README)
            self.asm = nn.AdaptiveLogSoftmaxWithLoss(C, cfg.vocab_size, list(cfg.cutoffs))
        else:            # output weights = tok_emb, plus a bias
            self.asm, self.out_bias = None, nn.Parameter(torch.zeros(cfg.vocab_size))
        # RMT auxiliary loss: the output logit of the memory's own target, id V (no data token)
        self.mem_target = None
        if cfg.aux_mem_loss:
            self.mem_target = nn.Linear(C, 1)
        self.apply(self._init)
        for p in (self.u, self.v):
            nn.init.normal_(p, std=0.02)
        if self.mem_init is not None:
            # Distinct small rows, N(0, 1e-3^2). Zeros fail at depth: in the first segment the
            # read slots see only each other, so every post-LN LayerNorm on their path normalises
            # a vector of variance 0 and multiplies the gradient by 1/sqrt(eps) (about 316); the
            # gradient of the initial memory grows about 1e5 per layer (non-finite at 6 layers).
            # Rows at the embedding scale (std >= 0.02; the original: identical N(0, 1) rows)
            # dominate the write slots' LayerNorm, so the memory starts without content: copy
            # stayed at chance. At 1e-3 the step-1 gradient of mem_init is 0.1-4x that of the
            # largest other parameter at 2 to 16 layers and every preset's width (README).
            nn.init.normal_(self.mem_init, std=1e-3)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, 'bias', None) is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx, state=None, targets=None):
        """idx (B, T_all) is cut into segments of cfg.seg_len; memory.run_segments carries the
        state across them and places the BPTT cut points."""
        return memory.run_segments(self.segment, idx, state, targets, self.cfg.seg_len,
                                   self.cfg.bptt_depth, self.cfg.grad_checkpoint)

    def segment(self, idx, state=None, targets=None):
        """One segment: idx (B, T) with the state of the previous segment (memory.State or None).
        -> log-probs (B, T, V), or per-token NLL (B, T) given targets, and the next state."""
        cfg = self.cfg
        cache, mem, kept = None, None, None
        if state is not None:
            cache, mem, kept = state
        B, T = idx.shape
        x = self.drop(self.tok_emb(idx) * math.sqrt(cfg.d_model))                 # (B, T, C)
        # the first segment reads the learned initial memory; MT reads it in every segment
        if mem is None and cfg.n_mem_tokens:
            mem = self.mem_init.expand(B, -1, -1)                               # (B, M, C)
        h, n_read, n_write = memory.read_write(x, mem, cfg.arch)                  # (B, S, C)
        P = 0
        if cache is not None:
            P = cache[0].size(1)
        S = h.size(1)
        mask = build_mask(P, n_read, T, n_write, idx.device)                     # (S, K)
        # every distance a query can have to a key, descending: P+S-1 (the oldest cached state
        # seen from the last slot) down to -S (bidirectional memory: keys after the query)
        pos = torch.arange(P + S - 1, -S - 1, -1, device=idx.device)             # (R,)
        if cfg.clamp_len > 0:
            pos = pos.clamp(-cfg.clamp_len, cfg.clamp_len)
        pos = self.drop(sinusoid(pos, cfg.d_model))                              # (R, C)
        hids, new_kept = [], []
        for l, block in enumerate(self.blocks):
            hids.append(h[:, n_read:n_read + T])   # XL caches token positions, never memory slots
            cache_l, kept_l = None, None
            if cache is not None:
                cache_l = cache[l]
            if kept is not None:
                kept_l = kept[l]
            h, kept_l = block(h, cache=cache_l, kept=kept_l, pos=pos, mask=mask, u=self.u,
                              v=self.v)
            new_kept.append(kept_l)
        h = self.drop(h)
        cache = memory.update_cache(cache, hids, cfg.mem_len)
        kept = memory.update_kept(new_kept, P, n_read, T, cfg.mem_len)
        mem = memory.write_memory(h, n_write)
        new_state = None
        if cache is not None or mem is not None:
            new_state = memory.State(cache, mem, kept)
        out = h[:, n_read:n_read + T]                                            # (B, T, C)
        if targets is None:
            return self.log_probs(out), new_state                                # (B, T, V)
        nll = self.nll(out, targets)                                             # (B, T)
        if self.training and cfg.aux_mem_loss:
            # spread over the segment's tokens, so that their mean adds weight * aux
            nll = nll + cfg.aux_mem_loss * self.mem_target_nll(mem).mean(1, keepdim=True)
        return nll, new_state

    def mem_target_nll(self, mem):
        """RMT paper's auxiliary loss: -log p(V | write memory) (B, M), where V is an output id of
        the memory's own that no data token has. V competes with the real vocabulary (for the
        adaptive softmax: with the head's classes); token positions never see it, so their
        distribution, and bpc or perplexity, stay normalised over the data's vocabulary."""
        if self.asm is not None:
            real = self.asm.head(mem)                                      # (B, M, head size)
        else:
            real = F.linear(mem, self.tok_emb.weight, self.out_bias)       # (B, M, V)
        logits = torch.cat([real, self.mem_target(mem)], -1).float()      # (B, M, V+1)
        return logits.logsumexp(-1) - logits[..., -1]                     # (B, M)

    def log_probs(self, h):
        """Log-probabilities (B, T, V): tied output layer with bias, or the adaptive softmax."""
        if self.asm is not None:
            return self.asm.log_prob(h.flatten(0, 1)).view(*h.shape[:2], -1)
        return F.log_softmax(F.linear(h, self.tok_emb.weight, self.out_bias), -1)

    def nll(self, h, targets):
        """Per-position negative log-likelihood (B, T) of targets."""
        if self.asm is not None:
            return -self.asm(h.flatten(0, 1), targets.flatten()).output.view(targets.shape)
        logits = F.linear(h, self.tok_emb.weight, self.out_bias)                 # (B, T, V)
        return F.cross_entropy(logits.transpose(1, 2), targets, reduction='none')

    @torch.no_grad()
    def generate(self, prompt, n_new, state=None, temperature=0.0, top_k=0, generator=None):
        """Continue prompt (B, T0 >= 1) by n_new tokens, segment by segment with the memory
        carried, exactly as in training: the current (partial) segment is recomputed from the
        state before it for every new token (RMT write memory depends on the whole segment).
        temperature 0: greedy (argmax); else sample from softmax(logits / temperature), among
        the top_k most likely tokens if top_k > 0, drawing from `generator`. Returns (B, n_new)."""
        seg_len, new = self.cfg.seg_len, []
        n_full = (prompt.size(1) - 1) // seg_len
        if n_full:
            _, state = self(prompt[:, :n_full * seg_len], state)
        cur = prompt[:, n_full * seg_len:]                                       # (B, 1..T)
        for _ in range(n_new):
            logits, next_state = self.segment(cur, state)
            nxt = next_token(logits[:, -1].float(), temperature, top_k, generator)  # (B, 1)
            new.append(nxt)
            if cur.size(1) == seg_len:               # segment full: its state becomes the memory
                state, cur = next_state, nxt
            else:
                cur = torch.cat([cur, nxt], 1)
        return torch.cat(new, 1)

    def flops_per_token(self, train=True):
        """Model FLOPs per segment token (2 per multiply-add; backward = 2x forward): projections
        (keys and values over the K = P+S keys in training, over the S new ones in evaluation,
        which keeps the cache's), attention scores, values and positional term, FFN, output
        layer. W_R runs once per segment for the whole batch: left out. For MFU."""
        cfg = self.cfg
        T, HD, M = cfg.seg_len, cfg.n_head * cfg.d_head, cfg.n_mem_tokens
        S = T + M
        if cfg.arch in ('rmt', 'xl_rmt'):
            S = T + 2 * M
        K, C, projected, passes = cfg.mem_len + S, cfg.d_model, S, 1
        if train:
            projected, passes = K, 3
        layer = C * HD * (2 * S + 2 * projected) + HD * S * (3 * K + S) + 2 * S * C * cfg.d_inner
        return 2 * passes * (cfg.n_layer * layer / T + C * cfg.vocab_size)

    def mfu(self, tok_per_s, train, dtype):
        """'X TFLOP/s' of model arithmetic at tok_per_s, and on a known GPU (A100, H100, H200)
        the fraction of its dense bf16 peak (TF32: half) that this is: the MFU."""
        flops = self.flops_per_token(train) * tok_per_s / 1e12                  # TFLOP/s
        gpu = ''
        if self.tok_emb.weight.is_cuda:
            gpu = torch.cuda.get_device_name(self.tok_emb.weight.device)
        peak = next((v for k, v in {'H100': 989, 'H200': 989, 'A100': 312}.items() if k in gpu), 0)
        if dtype == torch.float32:
            peak /= 2
        if not peak:
            return f'{flops:.3f} TFLOP/s'
        return f'{flops:.1f} TFLOP/s | mfu {flops / peak:.1%}'


def next_token(logits, temperature=0.0, top_k=0, generator=None):
    """One token per row of logits (B, V): the argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top_k largest logits (0 = all). -> (B, 1)"""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.size(-1))).values[:, -1:]            # (B, 1)
        logits = logits.masked_fill(logits < kth, float('-inf'))
    return torch.multinomial(F.softmax(logits, -1), 1, generator=generator)      # (B, 1)


# ============================================================================= speed only
# Everything below exists only to make the code above faster. Each piece is tested equal (values
# and gradients, or the distribution) to the plain formula it replaces; a learner may skip it.

class RelShift(torch.autograd.Function):
    """rel_shift (above) with a cheaper backward. Autograd's backward of its two slices fills
    two zero tensors of x's size and copies the gradient twice; the gradient of x is the output's
    gradient written through the same strided view into one zero tensor. Tested equal to
    rel_shift, values and gradients."""

    @staticmethod
    def forward(ctx, x, K):
        ctx.shape = x.shape
        return rel_shift(x, K)

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad.new_zeros(ctx.shape)
        rel_shift(grad_x, grad.size(-1)).copy_(grad)
        return grad_x, None


def use_sdpa(q):
    """Where torch's fused attention (SDPA) beats the plain formula of `attention`: on CUDA, and
    for CPU fp32 inference. On the CPU, SDPA falls back to a slower path when its bias needs a
    gradient or in bf16 (2.5x slower in our bench); the plain formula also masks in place and
    never builds the bias. test_all.py checks that both paths agree."""
    return q.is_cuda or (q.dtype == torch.float32 and not torch.is_grad_enabled())


def sdpa_attention(q, k, val, pos_scores, mask, dropatt):
    """`attention` through F.scaled_dot_product_attention: the mask folded into the bias."""
    return F.scaled_dot_product_attention(q, k, val, pos_scores.masked_fill(~mask, float('-inf')),
                                          dropout_p=dropatt)


def dropout(x, p):
    """Training-time dropout: zero each element with probability p, scale the rest by 1/(1-p).
    On CUDA torch's fused kernel (F.dropout, the plain formula); on the CPU the cheaper mask
    below, applied in one pass forward and one backward (ScaleByMask)."""
    if p == 0:
        return x
    if x.is_cuda:
        return F.dropout(x, p)
    return ScaleByMask.apply(x, keep_mask(x.shape, p).to(x.dtype), 1 / (1 - p))


def keep_mask(shape, p):
    """Dropout's keep mask, bfloat16 1.0 = keep and 0.0 = drop, with P(keep) = 1 - t / 2^15, t =
    round(p * 2^15) (at most 2^15 - 1), within 2e-5 of 1 - p. torch's own dropout on the CPU
    draws one random double per element (bernoulli_), the largest cost after the matmuls in bf16
    training; 15 random bits per element are enough, and one 63-bit integer from random_ gives
    four of them: 3.8x cheaper at the FFN's size. The mask is computed in place on the 64-bit
    integers, four 16-bit lanes at once (10x faster than on int16): set each lane's top bit and
    subtract t, and the top bit stays set exactly when the lane's 15 random bits h >= t (no borrow
    leaves the lane); moved to the lane's bottom and multiplied by 0x3F80 (the bits of bfloat16
    1.0), it is the mask. A 0/1 mask in the data's dtype multiplies in one vectorised pass, 6x
    faster than a bool one (torch.where); in place, no new memory is touched (page faults)."""
    n, t = math.prod(shape), min(round(p * 2 ** 15), 2 ** 15 - 1)
    lanes = 0x0001000100010001                                        # 1 in each 16-bit lane
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_()     # 63 random bits each
    bits.bitwise_or_(0x8000 * lanes - 2 ** 64).sub_(t * lanes)        # lane's bit 15: h >= t
    bits.bitwise_right_shift_(15).bitwise_and_(lanes).mul_(0x3F80)
    mask = bits.view(torch.bfloat16)[:n].view(shape)
    # torch.compile (2.13) fails on a dtype view of an int64 tensor leaving its graph: give a copy
    return mask.clone() if torch.compiler.is_compiling() else mask


class ScaleByMask(torch.autograd.Function):
    """x * mask * s with a 0/1 mask, forward and backward each one addcmul pass (autograd through
    torch.where(mask, x * s, 0) takes two passes each way). Tested equal to that formula, values
    and gradients."""

    @staticmethod
    def forward(ctx, x, mask, s):
        ctx.save_for_backward(mask)
        ctx.s = s
        return torch.addcmul(x.new_zeros(()), x, mask, value=s)

    @staticmethod
    def backward(ctx, grad):
        mask, = ctx.saved_tensors
        return torch.addcmul(grad.new_zeros(()), grad, mask, value=ctx.s), None, None


class Dropout(nn.Dropout):
    """nn.Dropout through `dropout` above."""

    def forward(self, x):
        if not self.training:
            return x
        return dropout(x, self.p)
