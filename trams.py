"""TRAMS: Training-free Memory Selection (Yu et al., EMNLP 2023 Findings) for an `xl` checkpoint.
The pool stays XL's FIFO of M = mem_len inputs per layer; at evaluation each layer, head and batch
row attends to [K selected | R recent | current]: the R newest pool states, plus the K older ones
with the best score. `python trams.py out/ckpt.pt`: the paper's M 400, R 150, K 50, segment 64.
Shapes: B batch, H heads, S segment, P pool, N = P-R candidates, n = K+R kept, D head, C d_model."""
import argparse
import itertools
import math
import resource
import sys
import time
from dataclasses import dataclass, field, replace

import torch

import data
from model import MemTransformer, ModelConfig, attention, rel_shift
from train import die, load_checkpoint

SELECTORS = ('trams', 'trams_paper', 'oracle', 'random', 'none')


def score_weights(w_q, H):
    """[Rᵀ | q1] (H, D, D+1) of W_Q: W_Q,hᵀ = Q R (QR, so ‖W_Q,hᵀ k‖ = ‖R k‖) and q1 = W_Q,h 1."""
    w = w_q.view(H, -1, w_q.size(1)).transpose(1, 2)                           # W_Q,hᵀ (H, C, D)
    return torch.cat([torch.linalg.qr(w).R.transpose(1, 2), w.sum(1)[..., None]], -1)  # (H,D,D+1)


def trams_scores(w_q, k, paper=False, rq=None):
    """TRAMS §3.2 scores of K' = W_Q,hᵀ k (C-dim) from k (B, H, N, D), never building K': ‖K'‖ =
    ‖R k‖, ΣK' = q1·k (rq: score_weights(w_q)). Official code ‖K'‖·|ΣK'|; paper: ΣK'/sqrt(C)."""
    rq = score_weights(w_q, k.size(1)) if rq is None else rq
    kz = k.transpose(0, 1).flatten(1, 2) @ (rq[..., -1:] if paper else rq)   # (H, B N, D+1)
    s = kz[..., -1] / math.sqrt(w_q.size(1)) if paper else \
        torch.linalg.vector_norm(kz[..., :-1] * kz[..., -1:], dim=-1)          # ‖R k‖·|q1·k|
    return s.view(k.size(1), k.size(0), -1).transpose(0, 1)                   # (B, H, N)


def probs(qu, k, bd, mask):
    """Attention probabilities (B, H, S, K) as `model.attention` forms them (bd already scaled)."""
    logits = qu @ k.transpose(2, 3) / math.sqrt(k.size(3)) + bd                # (B, H, S, K)
    return logits.masked_fill(~mask, float('-inf')).softmax(-1)


def select(scores, n_topk, P):
    """Kept pool indices in time order: the n_topk best of the N oldest, then the P-N recent."""
    old = scores.topk(n_topk, -1).indices.sort(-1).values                     # (B, H, K)
    recent = torch.arange(scores.size(-1), P, device=scores.device)
    return torch.cat([old, recent.expand(*old.shape[:2], -1)], -1)             # (B, H, n)


def positions(raw, S, idx=None):
    """Positional scores (B, H, S, n+S) from raw = (q+v)·W_R r / sqrt(D). idx None: contiguous slots
    (official code: selected states look closer); idx (B, H, n): true distances, column S-1-i+j."""
    bd = rel_shift(raw, raw.size(-1) - S)                                      # (B, H, S, P+S)
    if idx is None:
        return bd
    kept = bd[..., :-S].gather(-1, idx[:, :, None].expand(-1, -1, S, -1))     # (B, H, S, n)
    return torch.cat([kept, bd[..., -S:]], -1)                                # (B, H, S, n+S)


@dataclass
class Selection:
    """What attention sees of the pool; `attach(model, sel)` for evaluation, never for training."""
    mem_select: str = 'trams'      # trams (official code) | trams_paper | oracle | random | none
    select_recent: int = 150       # R: newest pool states, always kept
    select_topk: int = 50          # K: best older states kept (the paper's m = R + K)
    select_true_pos: bool = False  # selected states keep their true distances (default: compressed)
    select_layers: tuple = ()      # layers that select (paper Fig. 7); () = all
    stats: bool = False            # sum the attention probability that lands on the memory
    mass: float = 0.0              # stats: attention probability on memory, summed over ...
    queries: int = 0               # ... this many (query, head, layer) triples
    picked: dict = field(default_factory=dict)  # layer -> kept pool indices (B, H, n), for --show
    kv: dict = field(default_factory=dict)      # layer -> kept K/V, scores, pool end, score_weights
    gen: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))  # random

    @torch.no_grad()
    def attend(self, attn, q, h, cache, pos, u, v, mask):
        """Attention over [selected | recent | current] of the pool (nothing to drop: plain XL)."""
        (B, H, S, D), P, R, K = q.shape, cache.size(1), self.select_recent, self.select_topk
        how = self.mem_select if attn.layer in (self.select_layers or [attn.layer]) else 'none'
        on, old = how != 'none' and R + K < P, self.kv.get(attn.layer)
        reuse = on and old is not None and old[2] >= P and old[0].size(2) >= 2 * (P + S)
        x = h if reuse else torch.cat([cache, h], 1)
        k, val = attn.kv(x).view(B, x.size(1), 2, H, D).permute(2, 0, 3, 1, 4)  # (B, H, ., D)
        if on:  # a state's key, value and score: computed once, as it enters, then kept as rows
            kv, sc, end, rq = old if reuse else (     # [k | v] and score rows; the pool ends at end
                k.new_empty(B, H, 2 * (P + S), 2 * D), k.new_zeros(B, H, 2 * (P + S)), P,
                score_weights(attn.q.weight, H))
            if end + S > kv.size(2):   # full: the pool to the front (no overlap: end - P > P + S)
                kv[:, :, :P], sc[..., :P], end = kv[:, :, end - P:end], sc[..., end - P:end], P
            new = slice(end + S - x.size(1), end + S)      # rows of x's states, the segment last
            kv[:, :, new, :D], kv[:, :, new, D:] = k, val
            if how in ('trams', 'trams_paper'):              # content only: fixed with the key
                sc[..., new] = trams_scores(attn.q.weight, k, how == 'trams_paper', rq)
            self.kv[attn.layer] = kv, sc, end + S, rq
        n = R + K if on else P
        full = on and (self.select_true_pos or how == 'oracle')      # every distance needed
        r = attn.r(pos if full else pos[P - n:]).view(-1, H, D).transpose(0, 1)  # (H, ., D)
        raw = (q + v[:, None]) / math.sqrt(D) @ r.transpose(1, 2)  # (B, H, S, .), scaled as XL
        if on:  # the pool is in every query's past: the mask keeps its columns P-n: as they are
            if how == 'oracle':  # paper Fig. 1 upper bound: the attention mass each candidate gets
                scores = probs(q + u[:, None], kv[:, :, end - P:end + S, :D], positions(raw, S),
                               mask)[..., :P - R].sum(2)                        # (B, H, P-R)
            elif how == 'random':
                scores = torch.rand(B, H, P - R, generator=self.gen).to(q.device)
            else:
                scores = sc[..., end - P:end - R]
            idx = select(scores, K, P + S)         # (B, H, n+S): kept pool states, the segment
            self.picked[attn.layer] = idx[..., :n]
            rows = idx + end - P + kv.size(2) * torch.arange(B * H, device=q.device).view(B, H, 1)
            k, val = kv.view(-1, 2 * D).index_select(0, rows.view(-1)).view(
                B, H, n + S, 2 * D).split(D, -1)                                # (B, H, n+S, D)
            mask = mask[:, P - n:]
            raw = raw[..., P - n:] if full and not self.select_true_pos else raw
        bd = positions(raw, S, idx[..., :n] if on and self.select_true_pos else None)  # (., n+S)
        if self.stats:  # attention probability on the n memory keys (an untimed pass)
            p = probs(q + u[:, None], k, bd, mask)                               # (B, H, S, n+S)
            self.mass, self.queries = self.mass + p[..., :n].sum(), self.queries + B * H * S
        return attention(q + u[:, None], k, val, bd, mask)                        # (B, H, S, D)


def attach(model, sel):
    """Route every layer's attention through `sel.attend` (sel = None: back to plain XL)."""
    for l, block in enumerate(model.blocks):
        block.attn.selection, block.attn.layer = sel, l

# ----------------------------------------------------------------------------- command line


def evaluate(model, tokens, sel, a, device):
    """Paper protocol: contiguous streams, every target scored once, memory carried. Returns
    (mean NLL, tokens scored, seconds, probability on memory, peak MB)."""
    model.cfg = replace(model.cfg, mem_len=a.pool, seg_len=a.seg_len)
    attach(model, sel if sel.mem_select != 'none' or sel.stats else None)  # timed XL: model's own
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    t0, state, nll, n = time.time(), None, 0.0, 0
    with torch.no_grad():
        for x, y in data.Stream(tokens, a.batch_size, a.seg_len).eval_windows(
                a.seg_len, a.eval_tokens or None):
            out, state = model(x.to(device), state, y.to(device))
            nll, n = nll + out.sum(), n + out.numel()
    nll, dt = float(nll), time.time() - t0          # float() waits for the GPU
    attach(model, None)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == 'cuda' else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # CPU: the whole process's
    return nll / n, n, dt, float(sel.mass) / max(sel.queries, 1), peak


def compare(model, tokens, a, device, rows):
    """rows: (name, mem_select, pool). Pass 0: metrics and statistic; then --repeat timed passes."""
    res, times = {}, []
    for rep in range(a.repeat + 1):
        for name, how, pool in rows:
            sel = Selection(how, a.select_recent, a.select_topk, a.select_true_pos,
                            a.select_layers, stats=rep == 0)
            r = evaluate(model, tokens, sel, argparse.Namespace(**vars(a), pool=pool), device)
            res[name] = res.get(name, r)
            times.append(r[2])
    t = torch.tensor(times).view(a.repeat + 1, len(rows))[1:]         # (repeat, rows) seconds
    dt, ratio = t.median(0).values, (t / t[:, :1]).median(0).values   # ratio: within a pass
    return {k: (*r[:2], dt[i], ratio[i], *r[3:]) for i, (k, r) in enumerate(res.items())}


def show(model, corpus, a, device):
    """Paper Table 3: memory text with the TRAMS picks in [brackets], then the segment predicted."""
    sel = Selection('trams', a.select_recent, a.select_topk, a.select_true_pos)
    model.cfg = replace(model.cfg, mem_len=a.mem_len, seg_len=a.seg_len)
    attach(model, sel)
    seen, state, windows = [], None, data.Stream(corpus.test, 1, a.seg_len).eval_windows(a.seg_len)
    with torch.no_grad():
        for _, (x, _) in zip(range(-(-a.mem_len // a.seg_len) + 1), windows):
            _, state = model(x.to(device), state)
            seen.append(x[0])
    hist, layer = torch.cat(seen[:-1]).tolist()[-a.mem_len:], a.layer % model.cfg.n_layer
    if len(hist) <= a.select_recent + a.select_topk:
        die('the test split is too short to fill the pool: lower --mem_len')
    keep, N = set(sel.picked[layer][0, a.head].tolist()), len(hist) - a.select_recent
    runs = itertools.groupby(range(N), lambda j: j in keep)   # decoded together: UTF-8 stays whole
    sep = ' ' if corpus.itos is not None else ''

    def txt(ids):
        return corpus.decode(list(ids)).replace('\n', '⏎')
    print(f'layer {layer} head {a.head}: [the {a.select_topk} TRAMS picks] among the {N} oldest '
          f'of {len(hist)} pool states || the {a.select_recent} recent ones, always kept')
    print(sep.join(f'[{txt(hist[j] for j in js)}]' if kept else txt(hist[j] for j in js)
                   for kept, js in runs) + f'{sep}||{sep}' + txt(hist[N:]))
    print(f'predicting: {txt(seen[-1].tolist())}')


def main(argv):
    p = argparse.ArgumentParser(description='TRAMS evaluation of an xl checkpoint')
    p.error = die                  # bad flags: one line, exit 2, like train.py
    p.add_argument('ckpt')
    for name, default in dict(task='', data_path='', data_dir='', mem_len=400, select_recent=150,
                              select_topk=50, seg_len=64, batch_size=10, eval_tokens=0, repeat=1,
                              select_layers='', sweep='', layer=-1, head=0, device='auto').items():
        p.add_argument(f'--{name}', type=type(default), default=default)
    for name in ('--select_true_pos', '--show'):
        p.add_argument(name, action='store_true')
    a = p.parse_args(argv)
    ckpt = load_checkpoint(a.ckpt)
    mc, tc, task = ckpt['model_cfg'], ckpt['train_cfg'], a.task or ckpt['train_cfg']['task']
    if mc['arch'] != 'xl' or task not in data.LM_TASKS:
        die(f"TRAMS needs an xl checkpoint and a language-modelling task, not '{mc['arch']}' on "
            f"'{task}' ({a.ckpt})")
    key, _, vals = a.sweep.partition('=')
    try:
        a.select_layers = tuple(int(v) for v in a.select_layers.split(',') if v)
        settings = [argparse.Namespace(**{**vars(a), key: int(v)}) for v in vals.split(',') if v]
    except ValueError:
        die('--select_layers and --sweep take comma-separated integers')
    if a.sweep and not (key in ('mem_len', 'select_topk', 'select_recent', 'seg_len') and settings):
        die('--sweep takes mem_len=, select_topk=, select_recent= or seg_len= and values')
    if any(min(b.seg_len, b.batch_size, b.select_topk, b.repeat, b.select_recent + 1) < 1
           or b.select_recent + b.select_topk >= b.mem_len for b in settings or [a]):
        die('need --seg_len --batch_size --select_topk --repeat >= 1, --select_recent >= 0 and '
            '--select_recent + --select_topk < --mem_len (else nothing is dropped)')
    if not all(0 <= i < mc['n_layer'] for i in a.select_layers) or not 0 <= a.head < mc['n_head']:
        die(f"--select_layers / --head out of range: {mc['n_layer']} layers, {mc['n_head']} heads")
    device = torch.device(('cuda' if torch.cuda.is_available() else 'cpu')
                          if a.device == 'auto' else a.device)
    try:
        corpus = data.load_corpus(task, a.data_dir or tc['data_dir'],
                                  a.data_path or tc['data_path'])
    except data.DataError as e:
        die(str(e))
    model = MemTransformer(ModelConfig(**mc)).to(device).eval()
    model.load_state_dict(ckpt['model'])
    if a.show:
        return show(model, corpus, a, device)
    unit = 'ppl' if task == 'wt103' else 'bpc'
    print(f'M={a.mem_len} R={a.select_recent} K={a.select_topk} n={a.seg_len} B={a.batch_size} '
          f'true_pos={a.select_true_pos} layers={a.select_layers or "all"} on {device}, s = median')
    print(f"| {'setting | ' * bool(settings)}row | {unit} | tokens | s | vs XL(R+K) | "
          f"prob on memory | peak MB |\n|---|" + '---|' * (6 + bool(settings)))
    for b in settings or [a]:     # a sweep (paper Figs. 4-6): XL(R+K) and TRAMS per setting
        rows = [('XL mem R+K', 'none', b.select_recent + b.select_topk)] + [(name, how, b.mem_len)
                for name, how in (('XL mem M', 'none'), ('TRAMS', 'trams'), ('TRAMS (paper score)',
                                  'trams_paper'), ('oracle', 'oracle'), ('random', 'random'))]
        res = compare(model, corpus.test, b, device, [rows[0], rows[2]] if settings else rows)
        for name, (nll, n, dt, ratio, prob, peak) in res.items():
            print(f"| {f'{getattr(b, key)} | ' if settings else ''}{name} | "
                  f"{math.exp(nll) if unit == 'ppl' else nll / math.log(2):.4f} | {n} | {dt:.2f} |"
                  f' {ratio:.2f}x | {prob:.4f} | {peak:.0f} |', flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
