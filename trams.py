"""TRAMS: Training-free Memory Selection (Yu et al., EMNLP 2023 Findings) for an `xl` checkpoint.
The pool stays XL's FIFO of M = mem_len inputs per layer; at evaluation each layer, head and batch
row attends to [K selected | R recent | current]: the R newest pool states, plus the K older ones
with the best score. `python trams.py out/ckpt.pt`: the paper's M 400, R 150, K 50, segment 64.
Shapes: B batch, H heads, S segment, P pool, N = P-R candidates, n = K+R kept, D head, C d_model."""
import signal

if __name__ == '__main__':   # a signal while torch loads below: the default, an end at once
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # (exit 128 + the signal, no traceback)

import itertools
import math
import sys
import time
from dataclasses import dataclass, field, replace

import torch

import data
import memory
from model import MemTransformer, ModelConfig, check_limits, keep_all
from train import (catch_signals, choose_device, die, load_checkpoint, load_weights, parse_flags,
                   peak_memory, print_help, stop_at_once, stream_nll)

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


def probs(q_u, k, pos_scores, mask):
    """Attention probabilities (B, H, S, K) as `model.attention` forms them (pos_scores already
    scaled)."""
    logits = q_u @ k.transpose(2, 3) / math.sqrt(k.size(3)) + pos_scores       # (B, H, S, K)
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


def narrow_positions(pos_scores, idx, true_pos):
    """Positional scores (B, H, S, n+S) of the kept keys, from those of every key, pos_scores
    (B, H, S, P+S) at true distances, and the kept pool indices idx (B, H, n). true_pos: each kept
    pool state at its true distance; else (the official code) the n kept states take the n
    contiguous slots just before the segment: they look closer than they are."""
    S, n = pos_scores.size(2), idx.size(2)
    P = pos_scores.size(3) - S
    if not true_pos:
        return pos_scores[..., P - n:]                                        # (B, H, S, n+S)
    kept = pos_scores[..., :P].gather(-1, idx[:, :, None].expand(-1, -1, S, -1))  # (B, H, S, n)
    return torch.cat([kept, pos_scores[..., P:]], -1)                         # (B, H, S, n+S)


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

    def narrow(self, attn, q_u, keys, values, pos_scores, mask, kept):
        """TRAMS's narrowing step, in place of model.keep_all (same arguments and result): score
        the older pool states, keep the top K of them and the R recent ones, gather their keys,
        values, positional scores and mask columns. keys (B, H, P+S, D) of [pool | segment]."""
        if attn.training:                        # selection is for evaluation only
            return keep_all(attn, q_u, keys, values, pos_scores, mask, kept)
        (B, H, S, D), R, K = q_u.shape, self.select_recent, self.select_topk
        P = keys.size(2) - S
        method = self.method(attn.layer)
        if R + K >= P:                           # nothing to drop (the pool still fills): XL
            method = 'none'
        with torch.no_grad():
            new_kept = self.score_pool(attn, keys, values, kept, method)
            n = P                                # memory keys attended
            if method != 'none':
                n = R + K
                # 1. score the P-R older pool states (the R newest are always kept)
                if method == 'oracle':   # paper Fig. 1 upper bound: the attention each receives
                    scores = probs(q_u, keys, pos_scores, mask)[..., :P - R].sum(2)  # (B,H,P-R)
                elif method == 'random':
                    scores = torch.rand(B, H, P - R, generator=self.gen).to(q_u.device)
                else:
                    scores = new_kept.scores[..., :P - R]                          # (B, H, P-R)
                # 2. top-K, in time order, then the recent block and the segment: n+S kept keys
                idx = select(scores, K, P + S)                                     # (B, H, n+S)
                self.picked[attn.layer] = idx[..., :n]
                # 3. gather their keys, values and positional scores; the mask keeps its last
                # n+S columns (the pool is in every query's past, so those columns are all True)
                keys, values = gather(keys, idx), gather(values, idx)             # (B,H,n+S,D)
                pos_scores = narrow_positions(pos_scores, idx[..., :n], self.select_true_pos)
                mask = mask[:, P - n:]                                             # (S, n+S)
            if self.stats:  # attention probability on the n memory keys (an untimed pass)
                p = probs(q_u, keys, pos_scores, mask)                             # (B,H,S,n+S)
                self.mass, self.queries = self.mass + p[..., :n].sum(), self.queries + B * H * S
        return keys, values, pos_scores, mask, new_kept

    def score_pool(self, attn, keys, values, kept, method):
        """memory.Kept of [pool | segment]: its keys and values (B, H, P+S, D), and for TRAMS their
        scores (B, H, P+S), content only, so each is computed once, when its state enters (the
        pool's are in kept). Other methods: no scores."""
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


def attach(model, sel):
    """Install `sel.narrow` as every layer's narrowing step (sel = None: back to plain XL's
    model.keep_all). The score weights of each W_Q are computed here, once: the weights are fixed
    in evaluation."""
    for block in model.blocks:
        block.attn.narrow = keep_all
        if sel is not None:
            block.attn.narrow = sel.narrow
            with torch.no_grad():
                sel.weights[block.attn.layer] = score_weights(block.attn.q.weight, block.attn.H)


# ----------------------------------------------------------------------------- command line
@dataclass
class TramsConfig:
    """The flags of `python trams.py CKPT` (parsed like train.py's)."""
    ckpt: str = ''             # the xl checkpoint to evaluate (also the first plain argument)
    task: str = ''             # '' = the checkpoint's; or another LM task of the same vocabulary
    data_path: str = ''        # '' = the checkpoint's (text: the file)
    data_dir: str = ''         # '' = the checkpoint's
    mem_len: int = 400         # M: the pool of layer inputs per layer
    select_recent: int = 150   # R: newest pool states, always kept
    select_topk: int = 50      # K: best older states kept (the paper's m = R + K)
    select_true_pos: bool = False  # selected states at their true distances (default: the
    #                                official code's contiguous slots just before the recent ones)
    select_layers: tuple = ()  # layers that select, e.g. 2,3 (paper Fig. 7); () = all
    seg_len: int = 64          # n: segment length at evaluation
    batch_size: int = 10       # streams of the test split
    eval_tokens: int = 0       # tokens per stream row to score (0 = the whole test split)
    repeat: int = 1            # timed passes per row (seconds: their median)
    sweep: str = ''            # NAME=v1,v2,..: XL(R+K) and TRAMS per value of mem_len,
    #                            select_topk, select_recent or seg_len (paper Figs. 4-6)
    intervals: int = 0         # > 0: each row minus XL(R+K) with a 95% paired bootstrap interval
    #                            of this many resamples
    show: bool = False         # paper Table 3: the pool's text with the TRAMS picks in [brackets]
    layer: int = -1            # --show: the layer (-1 = the last)
    head: int = 0              # --show: the head
    device: str = 'auto'       # auto | cpu | cuda | cuda:N

    def __post_init__(self):
        check_limits(self, TRAMS_LIMITS)
        if self.select_recent + self.select_topk > self.mem_len:
            raise ValueError(f'--select_recent {self.select_recent} + --select_topk '
                             f'{self.select_topk} exceed --mem_len {self.mem_len}: TRAMS selects '
                             'from the pool; lower them or raise --mem_len')


TRAMS_LIMITS = dict(mem_len='>= 1', select_recent='>= 0', select_topk='>= 1', seg_len='>= 1',
                    batch_size='>= 1', eval_tokens='>= 0', repeat='>= 1', intervals='>= 0',
                    head='>= 0')
SWEEPABLE = ('mem_len', 'select_topk', 'select_recent', 'seg_len')


def evaluate(model, tokens, sel, cfg, pool, device, label='row'):
    """Paper protocol: contiguous streams, every target scored once, memory carried (train.py's
    stream_nll, in float32), with a pool of `pool` states. Returns (mean NLL, tokens scored,
    seconds, probability on memory, peak MB, blocks): blocks (N, 2) holds the NLL sum and the
    token count of each (stream, segment), for paired intervals."""
    model.cfg = replace(model.cfg, mem_len=pool, seg_len=cfg.seg_len)
    routed = sel
    if sel.mem_select == 'none' and not sel.stats:
        routed = None                            # timed plain XL: the model's own attention
    attach(model, routed)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    with torch.no_grad():
        stream, limit = data.Stream(tokens, cfg.batch_size, cfg.seg_len), cfg.eval_tokens or None
        blocks = stream_nll(model, stream, cfg.seg_len, limit, device,
                            data.Progress(label, stream.eval_size(limit)))
    dt, (nll, n) = time.time() - t0, blocks.sum(0).tolist()
    attach(model, None)
    peak = peak_memory(device)                   # on a CPU: the whole process's peak
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


def compare(model, tokens, cfg, device, rows):
    """rows: (name, mem_select, pool). Pass 0: metrics and statistic; then --repeat timed passes."""
    res, times = {}, []
    for rep in range(cfg.repeat + 1):
        for name, method, pool in rows:
            sel = Selection(method, cfg.select_recent, cfg.select_topk, cfg.select_true_pos,
                            cfg.select_layers, stats=rep == 0)
            r = evaluate(model, tokens, sel, cfg, pool, device, f'{name} (pass {rep})')
            res[name] = res.get(name, r)
            times.append(r[2])
    t = torch.tensor(times).view(cfg.repeat + 1, len(rows))[1:]          # (repeat, rows) seconds
    dt, ratio = t.median(0).values, (t / t[:, :1]).median(0).values   # ratio: within a pass
    return {k: (*r[:2], dt[i], ratio[i], *r[3:]) for i, (k, r) in enumerate(res.items())}


def show(model, corpus, cfg, device):
    """Paper Table 3: memory text with the TRAMS picks in [brackets], then the segment predicted."""
    sel = Selection('trams', cfg.select_recent, cfg.select_topk, cfg.select_true_pos)
    model.cfg = replace(model.cfg, mem_len=cfg.mem_len, seg_len=cfg.seg_len)
    attach(model, sel)
    windows = data.Stream(corpus.test, 1, cfg.seg_len).eval_windows(cfg.seg_len)
    seen, state = [], None
    with torch.no_grad():
        for _, (x, _) in zip(range(-(-cfg.mem_len // cfg.seg_len) + 1), windows):
            _, state = model(x.to(device), state)
            seen.append(x[0])
    hist, layer = torch.cat(seen[:-1]).tolist()[-cfg.mem_len:], cfg.layer % model.cfg.n_layer
    if len(hist) <= cfg.select_recent + cfg.select_topk:
        die('the test split is too short to fill the pool: lower --mem_len')
    keep, N = set(sel.picked[layer][0, cfg.head].tolist()), len(hist) - cfg.select_recent
    runs = itertools.groupby(range(N), lambda j: j in keep)   # decoded together: UTF-8 stays whole
    sep = ' ' if corpus.itos is not None else ''

    def txt(ids):
        return corpus.decode(list(ids)).replace('\n', '⏎')
    print(f'layer {layer} head {cfg.head}: [the {cfg.select_topk} TRAMS picks] among the '
          f'{N} oldest of {len(hist)} pool states || the {cfg.select_recent} recent ones, '
          'always kept')
    print(sep.join(f'[{txt(hist[j] for j in js)}]' if kept else txt(hist[j] for j in js)
                   for kept, js in runs) + f'{sep}||{sep}' + txt(hist[N:]))
    print(f'predicting: {txt(seen[-1].tolist())}')


def make_settings(given):
    """-> (TramsConfig, the settings to run: one, or one per --sweep value, each checked)."""
    try:
        cfg = TramsConfig(**given)
        if not cfg.show and {'layer', 'head'} & given.keys():
            raise ValueError('--layer and --head choose what --show prints: add --show, or drop '
                             'them')
        if cfg.show and cfg.sweep:
            raise ValueError('--show prints one setting: drop --sweep')
        key, _, values = cfg.sweep.partition('=')
        if not cfg.sweep:
            return cfg, [cfg]
        if key not in SWEEPABLE or not values:
            raise ValueError(f"--sweep takes NAME=v1,v2,.. with NAME one of {', '.join(SWEEPABLE)}"
                             f", not '{cfg.sweep}'")
        try:
            values = [int(v) for v in values.split(',') if v]
        except ValueError:
            raise ValueError(f"--sweep values are integers, not '{values}'") from None
        return cfg, [replace(cfg, **{key: v}) for v in values]
    except (TypeError, ValueError) as e:
        die(str(e))


def main(argv):
    if '--help' in argv or '-h' in argv:
        return print_help((TramsConfig,), __doc__, presets=False)
    cfg, settings = make_settings(parse_flags(argv, (TramsConfig,), positional='ckpt'))
    if not cfg.ckpt:
        die('give the checkpoint of an xl model: python trams.py OUT_DIR/ckpt.pt')
    ckpt = load_checkpoint(cfg.ckpt)
    try:
        model_cfg, train_fields = ModelConfig(**ckpt['model_cfg']), dict(ckpt['train_cfg'])
    except (TypeError, ValueError) as e:
        die(f'{cfg.ckpt} holds no valid model configuration ({e}): use another checkpoint')
    task = cfg.task or train_fields['task']
    if model_cfg.arch != 'xl' or task not in data.LM_TASKS:
        die(f"TRAMS needs an xl checkpoint and a language-modelling task, not "
            f"'{model_cfg.arch}' on '{task}' ({cfg.ckpt})")
    layers_ok = all(0 <= i < model_cfg.n_layer for i in cfg.select_layers)
    layers_ok = layers_ok and -model_cfg.n_layer <= cfg.layer < model_cfg.n_layer  # -1: the last
    if not layers_ok or not cfg.head < model_cfg.n_head:
        die(f'--select_layers / --layer / --head out of range: {model_cfg.n_layer} layers, '
            f'{model_cfg.n_head} heads')
    device = torch.device(choose_device(cfg.device))
    try:
        corpus = data.load_corpus(task, cfg.data_dir or train_fields['data_dir'],
                                  cfg.data_path or train_fields['data_path'])
        for b in settings:                       # the test split must fill batch_size streams
            data.Stream(corpus.test, b.batch_size, b.seg_len)
    except data.DataError as e:
        die(str(e))
    if corpus.vocab_size != model_cfg.vocab_size:
        die(f"the {task} data have a vocabulary of {corpus.vocab_size}, the model of {cfg.ckpt} "
            f"{model_cfg.vocab_size}: evaluate on the data it was trained on (drop --task, "
            '--data_path, --data_dir)')
    model = MemTransformer(model_cfg).to(device).eval()
    load_weights(model, ckpt, cfg.ckpt)
    seen = model_cfg.mem_len + model_cfg.seg_len       # the distances training showed the model
    if max(b.mem_len for b in settings) > seen:
        print(f'note: a pool of {max(b.mem_len for b in settings)} states reaches distances the '
              f'model never saw in training (its mem_len {model_cfg.mem_len} + seg_len '
              f'{model_cfg.seg_len} = {seen}); train with a larger --mem_len to compare fairly',
              file=sys.stderr)
    if cfg.show:
        return show(model, corpus, cfg, device)
    unit = 'ppl' if task == 'wt103' else 'bpc'
    print(f'M={cfg.mem_len} R={cfg.select_recent} K={cfg.select_topk} n={cfg.seg_len} '
          f'B={cfg.batch_size} true_pos={cfg.select_true_pos} '
          f'layers={cfg.select_layers or "all"} on {device}, s = median')
    # --intervals N: each row's difference to XL(R+K) with its 95% paired bootstrap interval
    delta, key, swept = '', cfg.sweep.partition('=')[0], bool(cfg.sweep)
    if cfg.intervals:
        delta = f" {'nll (nats)' if unit == 'ppl' else 'bpc'} - XL(R+K) [95%] |"
    print(f"| {'setting | ' * swept}row | {unit} | tokens | s | vs XL(R+K) | "
          f"prob on memory | peak MB |{delta}\n|---|" + '---|' * (6 + swept + bool(delta)))
    for b in settings:     # a sweep (paper Figs. 4-6): XL(R+K) and TRAMS per setting
        m = b.select_recent + b.select_topk      # the paper's memory size m
        rows = [('XL mem R+K', 'none', m), ('TRAMS', 'trams', b.mem_len)]
        if not swept:
            rows[1:1] = [('XL mem M', 'none', b.mem_len), ('XL mem R', 'none', b.select_recent)]
            rows += [(name, method, b.mem_len) for name, method in (
                ('TRAMS (paper score)', 'trams_paper'), ('oracle', 'oracle'), ('random', 'random'))]
        rows = [r for r in rows if r[2] > 0]     # XL(R) with R = 0 would have no memory at all
        res = compare(model, corpus.test, b, device, rows)
        for name, (nll, n, dt, ratio, prob, peak, blocks) in res.items():
            line = (f"| {f'{getattr(b, key)} | ' if swept else ''}{name} | "
                    f"{math.exp(nll) if unit == 'ppl' else nll / math.log(2):.4f} | {n} | "
                    f'{dt:.2f} | {ratio:.2f}x | {prob:.4f} | {peak:.0f} |')
            if cfg.intervals:
                scale = 1 / math.log(2) if unit == 'bpc' else 1      # nats -> bits per byte
                d, lo, hi = (v * scale for v in paired_interval(
                    blocks, res['XL mem R+K'][-1], cfg.intervals))
                line += f' {d:+.4f} [{lo:+.4f}, {hi:+.4f}] |'
            print(line, flush=True)


if __name__ == '__main__':
    catch_signals(stop_at_once)  # Ctrl-C or SIGTERM: one line, exit 128 + the signal
    main(sys.argv[1:])
