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
import memory
from model import MemTransformer, ModelConfig, attention, rel_shift
from train import devices, die, load_checkpoint

SELECTORS = ('trams', 'trams_paper', 'oracle', 'random', 'none')


def score_weights(w_q, H):
    """[Rᵀ | q1] (H, D, D+1) of W_Q: W_Q,hᵀ = Q R (QR, so ‖W_Q,hᵀ k‖ = ‖R k‖) and q1 = W_Q,h 1."""
    w = w_q.view(H, -1, w_q.size(1)).transpose(1, 2)                           # W_Q,hᵀ (H, C, D)
    r_t = torch.linalg.qr(w).R.transpose(1, 2)                                 # Rᵀ (H, D, D)
    return torch.cat([r_t, w.sum(1)[..., None]], -1)                           # (H, D, D+1)


def trams_scores(w_q, k, paper=False, weights=None):
    """TRAMS scores (B, H, N) of keys k (B, H, N, D), from the reformulated key K' = W_Q,hᵀ k
    (C-dim), never built: ‖K'‖ = ‖R k‖ and ΣK' = q1·k (weights: score_weights(w_q), if known).
    Why K' predicts attention (TRAMS §2.2-2.4): the logit of a query token x (a LayerNorm output,
    so ‖x‖ is about the same for every query) and key k is x·K' = ‖x‖‖K'‖cos⟨x, K'⟩, so a key gets
    a high logit from most queries when ‖K'‖ is large and K' points where queries tend to point;
    the paper stands in the all-ones direction for the unknown queries. Paper: cos⟨K', 1⟩‖K'‖ =
    ΣK'/sqrt(C); the official code: ‖K'‖·|ΣK'|."""
    H = k.size(1)
    if weights is None:
        weights = score_weights(w_q, H)
    if paper:
        weights = weights[..., -1:]                                            # q1 only
    proj = k.transpose(0, 1).flatten(1, 2) @ weights                         # (H, B*N, D+1)
    if paper:
        score = proj[..., -1] / math.sqrt(w_q.size(1))                         # ΣK'/sqrt(C)
    else:
        score = torch.linalg.vector_norm(proj[..., :-1], dim=-1) * proj[..., -1].abs()
    return score.view(H, k.size(0), -1).transpose(0, 1)                       # (B, H, N)


def probs(q_u, k, bd, mask):
    """Attention probabilities (B, H, S, K) as `model.attention` forms them (bd already scaled)."""
    logits = q_u @ k.transpose(2, 3) / math.sqrt(k.size(3)) + bd               # (B, H, S, K)
    return logits.masked_fill(~mask, float('-inf')).softmax(-1)


def select(scores, n_topk, P):
    """Kept pool indices in time order: the n_topk best of the N oldest, then the P-N recent."""
    best = scores.topk(n_topk, -1).indices.sort(-1).values                    # (B, H, K)
    recent = torch.arange(scores.size(-1), P, device=scores.device)
    return torch.cat([best, recent.expand(*best.shape[:2], -1)], -1)           # (B, H, n)


def gather(t, idx):
    """Rows idx (B, H, n) of t (B, H, P, D) -> (B, H, n, D): one index_select on a flat view."""
    B, H, P, D = t.shape
    rows = idx + P * torch.arange(B * H, device=t.device).view(B, H, 1)        # (B, H, n)
    return t.reshape(B * H * P, D).index_select(0, rows.view(-1)).view(B, H, -1, D)


def positions(pos_scores, S, idx=None):
    """Positional scores (B, H, S, n+S) from pos_scores = (q+v)·W_R r / sqrt(D) over every
    distance. idx None: contiguous slots (official code: selected states look closer than they
    are); idx (B, H, n): each kept pool state at its true distance."""
    bd = rel_shift(pos_scores, pos_scores.size(-1) - S)                       # (B, H, S, P+S)
    if idx is None:
        return bd
    kept = bd[..., :-S].gather(-1, idx[:, :, None].expand(-1, -1, S, -1))     # (B, H, S, n)
    return torch.cat([kept, bd[..., -S:]], -1)                                # (B, H, S, n+S)


@dataclass
class Selection:
    """What attention sees of the pool; `attach(model, sel)` for evaluation, never for training.
    Holds settings and statistics only: the kept keys, values and scores travel in the model's
    state (memory.Kept), so a stream never sees another's, and reusing a Selection is safe."""
    mem_select: str = 'trams'      # trams (official code) | trams_paper | oracle | random | none
    select_recent: int = 150       # R: newest pool states, always kept
    select_topk: int = 50          # K: best older states kept (the paper's m = R + K)
    select_true_pos: bool = False  # selected states keep their true distances (default: compressed)
    select_layers: tuple = ()      # layers that select (paper Fig. 7); () = all
    stats: bool = False            # sum the attention probability that lands on the memory
    mass: float = 0.0              # stats: attention probability on memory, summed over ...
    queries: int = 0               # ... this many (query, head, layer) triples
    picked: dict = field(default_factory=dict)  # layer -> kept pool indices (B, H, n), for --show
    weights: dict = field(default_factory=dict)  # layer -> score_weights of its W_Q (by attach)
    gen: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))  # random

    def method(self, layer):
        if self.select_layers and layer not in self.select_layers:
            return 'none'
        return self.mem_select

    def pool_keys(self, attn, h, cache, kept, method):
        """memory.Kept of [pool | segment]: keys and values (B, H, P+S, D) from the layer, which
        projects only the segment when the pool's rows are kept; TRAMS scores (B, H, P+S), content
        only, so each is also computed once, when its state enters. Other methods: no scores."""
        keys, values = attn.keys_values(h, cache, kept)                      # (B, H, P+S, D)
        if method not in ('trams', 'trams_paper'):
            return memory.Kept(keys, values, None)
        known = 0                                # pool rows whose scores were kept
        if kept is not None and kept.scores is not None:
            known = kept.scores.size(2)
        scores = trams_scores(attn.q.weight, keys[:, :, known:], method == 'trams_paper',
                              self.weights.get(attn.layer))                  # (B, H, P+S-known)
        if known:
            scores = torch.cat([kept.scores, scores], 2)                     # (B, H, P+S)
        return memory.Kept(keys, values, scores)

    @torch.no_grad()
    def attend(self, attn, q, h, cache, kept, pos, u, v, mask):
        """TRAMS attention of one layer: keys of [pool | segment], score the older pool states,
        top-k, gather, attend over [K selected | R recent | segment]. Returns (B, H, S, D) and
        what to keep of [pool | segment]."""
        (B, H, S, D), P, R, K = q.shape, cache.size(1), self.select_recent, self.select_topk
        method = self.method(attn.layer)
        dropping = method != 'none' and R + K < P     # else plain XL (the pool is still filling)
        if not dropping:
            method = 'none'
        new = self.pool_keys(attn, h, cache, kept, method)
        keys, values = new.keys, new.values                                  # (B, H, P+S, D)
        n, true_idx = P, None          # memory keys attended; their pool indices (true_pos)
        if dropping:
            n = R + K
        # positional scores: every distance where all are needed, else only the n+2S nearest
        all_dist = not dropping or self.select_true_pos or method == 'oracle'
        r_pos = pos                                                          # (P+2S, C)
        if not all_dist:
            r_pos = pos[P - n:]                                              # (n+2S, C)
        pos_scores = attn.position_scores(q, v, r_pos).transpose(0, 1)       # (B, H, S, .)
        if dropping:
            # 1. score the P-R older pool states (the R newest are always kept)
            if method == 'oracle':   # paper Fig. 1 upper bound: the attention each one receives
                p = probs(q + u, keys, positions(pos_scores, S), mask)         # (B, H, S, P+S)
                scores = p[..., :P - R].sum(2)                                 # (B, H, P-R)
            elif method == 'random':
                scores = torch.rand(B, H, P - R, generator=self.gen).to(q.device)
            else:
                scores = new.scores[..., :P - R]                               # (B, H, P-R)
            # 2. top-K, in time order, then the recent block and the segment: n+S kept keys
            idx = select(scores, K, P + S)                                     # (B, H, n+S)
            self.picked[attn.layer] = idx[..., :n]
            # 3. gather their keys and values; the mask keeps its last n+S columns (the pool is
            # in every query's past, so those columns are all True)
            keys, values, mask = gather(keys, idx), gather(values, idx), mask[:, P - n:]
            if self.select_true_pos:
                true_idx = idx[..., :n]
            elif all_dist:
                pos_scores = pos_scores[..., P - n:]           # oracle: back to compressed slots
        # 4. attend; positions: contiguous slots, or the kept states' true distances
        bd = positions(pos_scores, S, true_idx)                                # (B, H, S, n+S)
        if self.stats:  # attention probability on the n memory keys (an untimed pass)
            p = probs(q + u, keys, bd, mask)                                   # (B, H, S, n+S)
            self.mass, self.queries = self.mass + p[..., :n].sum(), self.queries + B * H * S
        y = attention(q + u, keys, values, bd, mask)                           # (B, H, S, D)
        return y, new


def attach(model, sel):
    """Route every layer's attention through `sel.attend` (sel = None: back to plain XL). The
    score weights of each W_Q are computed here, once: the weights are fixed in evaluation."""
    for block in model.blocks:
        block.attn.selection = sel
        if sel is not None:
            with torch.no_grad():
                sel.weights[block.attn.layer] = score_weights(block.attn.q.weight, block.attn.H)


# ----------------------------------------------------------------------------- command line
def evaluate(model, tokens, sel, args, device):
    """Paper protocol: contiguous streams, every target scored once, memory carried. Returns
    (mean NLL, tokens scored, seconds, probability on memory, peak MB, blocks): blocks (N, 2)
    holds the NLL sum and the token count of each (stream, segment), for paired intervals."""
    model.cfg = replace(model.cfg, mem_len=args.pool, seg_len=args.seg_len)
    routed = sel
    if sel.mem_select == 'none' and not sel.stats:
        routed = None                            # timed plain XL: the model's own attention
    attach(model, routed)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    t0, state, blocks = time.time(), None, []
    with torch.no_grad():
        for x, y in data.Stream(tokens, args.batch_size, args.seg_len).eval_windows(
                args.seg_len, args.eval_tokens or None):
            out, state = model(x.to(device), state, y.to(device))                 # (B, w)
            nll = out.double().sum(1)                                               # (B,)
            blocks.append(torch.stack([nll, torch.full_like(nll, out.size(1))], 1))  # (B, 2)
    blocks = torch.cat(blocks).cpu()                 # .cpu() waits for the GPU: then the clock
    dt, (nll, n) = time.time() - t0, blocks.sum(0).tolist()
    attach(model, None)
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:                                        # the whole process's peak resident set
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return nll / n, int(n), dt, float(sel.mass) / max(sel.queries, 1), peak, blocks


def paired_interval(blocks, ref, n_boot, seed=0):
    """Mean-NLL difference (nats per token) of one row against ref and its 95% bootstrap interval:
    the (stream, segment) blocks are resampled with replacement, the same draws for both rows,
    so what both rows find hard cancels out (paired)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(ref), (n_boot, len(ref)), generator=gen)             # (n_boot, N)
    tokens = ref[:, 1][idx].sum(1)
    diffs = (blocks[:, 0][idx].sum(1) - ref[:, 0][idx].sum(1)) / tokens         # (n_boot,)
    lo, hi = diffs.quantile(torch.tensor([0.025, 0.975], dtype=diffs.dtype)).tolist()
    return (blocks[:, 0].sum() - ref[:, 0].sum()).item() / ref[:, 1].sum().item(), lo, hi


def compare(model, tokens, args, device, rows):
    """rows: (name, mem_select, pool). Pass 0: metrics and statistic; then --repeat timed passes."""
    res, times = {}, []
    for rep in range(args.repeat + 1):
        for name, method, pool in rows:
            sel = Selection(method, args.select_recent, args.select_topk, args.select_true_pos,
                            args.select_layers, stats=rep == 0)
            r = evaluate(model, tokens, sel, argparse.Namespace(**vars(args), pool=pool), device)
            res[name] = res.get(name, r)
            times.append(r[2])
    t = torch.tensor(times).view(args.repeat + 1, len(rows))[1:]         # (repeat, rows) seconds
    dt, ratio = t.median(0).values, (t / t[:, :1]).median(0).values   # ratio: within a pass
    return {k: (*r[:2], dt[i], ratio[i], *r[3:]) for i, (k, r) in enumerate(res.items())}


def show(model, corpus, args, device):
    """Paper Table 3: memory text with the TRAMS picks in [brackets], then the segment predicted."""
    sel = Selection('trams', args.select_recent, args.select_topk, args.select_true_pos)
    model.cfg = replace(model.cfg, mem_len=args.mem_len, seg_len=args.seg_len)
    attach(model, sel)
    windows = data.Stream(corpus.test, 1, args.seg_len).eval_windows(args.seg_len)
    seen, state = [], None
    with torch.no_grad():
        for _, (x, _) in zip(range(-(-args.mem_len // args.seg_len) + 1), windows):
            _, state = model(x.to(device), state)
            seen.append(x[0])
    hist, layer = torch.cat(seen[:-1]).tolist()[-args.mem_len:], args.layer % model.cfg.n_layer
    if len(hist) <= args.select_recent + args.select_topk:
        die('the test split is too short to fill the pool: lower --mem_len')
    keep, N = set(sel.picked[layer][0, args.head].tolist()), len(hist) - args.select_recent
    runs = itertools.groupby(range(N), lambda j: j in keep)   # decoded together: UTF-8 stays whole
    sep = ' ' if corpus.itos is not None else ''

    def txt(ids):
        return corpus.decode(list(ids)).replace('\n', '⏎')
    print(f'layer {layer} head {args.head}: [the {args.select_topk} TRAMS picks] among the '
          f'{N} oldest of {len(hist)} pool states || the {args.select_recent} recent ones, '
          'always kept')
    print(sep.join(f'[{txt(hist[j] for j in js)}]' if kept else txt(hist[j] for j in js)
                   for kept, js in runs) + f'{sep}||{sep}' + txt(hist[N:]))
    print(f'predicting: {txt(seen[-1].tolist())}')


def main(argv):
    p = argparse.ArgumentParser(description='TRAMS evaluation of an xl checkpoint')
    p.error = die                  # bad flags: one line, exit 2, like train.py
    p.add_argument('ckpt')
    for name, default in dict(task='', data_path='', data_dir='', mem_len=400, select_recent=150,
                              select_topk=50, seg_len=64, batch_size=10, eval_tokens=0, repeat=1,
                              select_layers='', sweep='', layer=-1, head=0, device='auto',
                              intervals=0).items():
        p.add_argument(f'--{name}', type=type(default), default=default)
    for name in ('--select_true_pos', '--show'):
        p.add_argument(name, action='store_true')
    args = p.parse_args(argv)
    ckpt = load_checkpoint(args.ckpt)
    mc, tc, task = ckpt['model_cfg'], ckpt['train_cfg'], args.task or ckpt['train_cfg']['task']
    if mc['arch'] != 'xl' or task not in data.LM_TASKS:
        die(f"TRAMS needs an xl checkpoint and a language-modelling task, not '{mc['arch']}' on "
            f"'{task}' ({args.ckpt})")
    key, _, vals = args.sweep.partition('=')
    try:
        args.select_layers = tuple(int(v) for v in args.select_layers.split(',') if v)
        settings = [argparse.Namespace(**{**vars(args), key: int(v)}) for v in vals.split(',') if v]
    except ValueError:
        die('--select_layers and --sweep take comma-separated integers')
    sweepable = ('mem_len', 'select_topk', 'select_recent', 'seg_len')
    if args.sweep and not (key in sweepable and settings):
        die('--sweep takes mem_len=, select_topk=, select_recent= or seg_len= and values')
    if any(min(b.seg_len, b.batch_size, b.select_topk, b.repeat, b.select_recent + 1,
               b.intervals + 1, b.eval_tokens + 1) < 1
           or b.select_recent + b.select_topk >= b.mem_len for b in settings or [args]):
        die('need --seg_len --batch_size --select_topk --repeat >= 1, --select_recent, '
            '--intervals and --eval_tokens >= 0, and '
            '--select_recent + --select_topk < --mem_len (else nothing is dropped)')
    layers_ok = all(0 <= i < mc['n_layer'] for i in args.select_layers)
    layers_ok = layers_ok and -mc['n_layer'] <= args.layer < mc['n_layer']    # -1: the last
    if not layers_ok or not 0 <= args.head < mc['n_head']:
        die(f"--select_layers / --layer / --head out of range: {mc['n_layer']} layers, "
            f"{mc['n_head']} heads")
    if args.device not in devices():
        die(f"unknown device '{args.device}': use one of {', '.join(devices())}")
    if args.device == 'auto':
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(args.device)
    try:
        corpus = data.load_corpus(task, args.data_dir or tc['data_dir'],
                                  args.data_path or tc['data_path'])
        for b in settings or [args]:             # the test split must fill batch_size streams
            data.Stream(corpus.test, b.batch_size, b.seg_len)
    except data.DataError as e:
        die(str(e))
    model = MemTransformer(ModelConfig(**mc)).to(device).eval()
    model.load_state_dict(ckpt['model'])
    if args.show:
        return show(model, corpus, args, device)
    unit = 'ppl' if task == 'wt103' else 'bpc'
    print(f'M={args.mem_len} R={args.select_recent} K={args.select_topk} n={args.seg_len} '
          f'B={args.batch_size} true_pos={args.select_true_pos} '
          f'layers={args.select_layers or "all"} on {device}, s = median')
    # --intervals N: each row's difference to XL(R+K) with its 95% paired bootstrap interval
    delta = ''
    if args.intervals:
        delta = f" {'nll (nats)' if unit == 'ppl' else 'bpc'} - XL(R+K) [95%] |"
    print(f"| {'setting | ' * bool(settings)}row | {unit} | tokens | s | vs XL(R+K) | "
          f"prob on memory | peak MB |{delta}\n|---|" + '---|' * (6 + bool(settings) + bool(delta)))
    for b in settings or [args]:     # a sweep (paper Figs. 4-6): XL(R+K) and TRAMS per setting
        m = b.select_recent + b.select_topk      # the paper's memory size m
        rows = [('XL mem R+K', 'none', m), ('TRAMS', 'trams', b.mem_len)]
        if not settings:
            rows[1:1] = [('XL mem M', 'none', b.mem_len), ('XL mem R', 'none', b.select_recent)]
            rows += [(name, method, b.mem_len) for name, method in (
                ('TRAMS (paper score)', 'trams_paper'), ('oracle', 'oracle'), ('random', 'random'))]
        rows = [r for r in rows if r[2] > 0]     # XL(R) with R = 0 would have no memory at all
        res = compare(model, corpus.test, b, device, rows)
        for name, (nll, n, dt, ratio, prob, peak, blocks) in res.items():
            line = (f"| {f'{getattr(b, key)} | ' if settings else ''}{name} | "
                    f"{math.exp(nll) if unit == 'ppl' else nll / math.log(2):.4f} | {n} | "
                    f'{dt:.2f} | {ratio:.2f}x | {prob:.4f} | {peak:.0f} |')
            if args.intervals:
                scale = 1 / math.log(2) if unit == 'bpc' else 1      # nats -> bits per byte
                d, lo, hi = (v * scale for v in paired_interval(
                    blocks, res['XL mem R+K'][-1], args.intervals))
                line += f' {d:+.4f} [{lo:+.4f}, {hi:+.4f}] |'
            print(line, flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
