"""
The single-command CPU test run: `python test_all.py` (or `python -m pytest test_all.py`).
Each test checks a property that a real bug would break; fixed seeds, tiny configs, no network.
"""
import contextlib
import http.client
import io
import os
import runpy
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile

import numpy as np
import torch

import data
from data import (SQEQ_CHARS, DataError, Examples, Stream, generate, load_corpus, make_splits,
                  split_checksum, task_spec)
import memory
from model import ARCHS, MemTransformer, ModelConfig, build_mask, rel_shift

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny(arch, **kw):
    torch.manual_seed(0)
    cfg = dict(arch=arch, vocab_size=12, n_layer=2, n_head=2, d_model=32, d_head=16, d_inner=64,
               dropout=0.0, seg_len=5, mem_len=4, n_mem_tokens=3)
    return MemTransformer(ModelConfig(**{**cfg, **kw}))


def emb_grads(model, idx, loss_fn):
    """Gradient of loss_fn(output) w.r.t. every segment's token embeddings -> (T_all,) norms."""
    embs = []

    def keep(module, inputs, out):
        out.retain_grad()
        embs.append(out)
    hook = model.tok_emb.register_forward_hook(keep)
    out, _ = model(idx)
    hook.remove()
    loss_fn(out).backward()
    return torch.cat([e.grad if e.grad is not None else torch.zeros_like(e) for e in embs],
                     1).abs().sum((0, 2))


def run(*args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True,
                          timeout=timeout)

# ----------------------------------------------------------------------------- model


def test_shapes_every_arch():
    for arch in ARCHS:
        m = tiny(arch)
        out, state = m(torch.randint(0, 12, (2, 13)))
        assert out.shape == (2, 13, 12), arch
        if arch in ('xl', 'xl_rmt'):
            assert len(state.cache) == 2 and state.cache[0].shape == (2, 4, 32)
        if arch in ('rmt', 'xl_rmt'):
            assert state.mem.shape == (2, 3, 32)
        if arch in ('baseline', 'mt'):
            assert state is None          # nothing flows between segments


def test_no_future_leakage_every_arch():
    idx = torch.randint(0, 12, (2, 13))
    for arch in ARCHS:
        for t in (0, 4, 5, 9, 12):        # segment starts, ends and middles
            g = emb_grads(tiny(arch), idx, lambda out: out[:, t].sum())
            assert g[t + 1:].sum() == 0, (arch, t, g)
            assert g[t] > 0


def test_rel_shift_gives_true_signed_distances():
    B, H, K = 2, 3, 9
    for S in (1, 5):
        x = torch.randn(B, H, S, K + S)           # columns: distances K-1 ... -S
        dist = torch.arange(S)[:, None] + (K - S) - torch.arange(K)[None]
        ref = x.gather(-1, ((K - 1) - dist).expand(B, H, S, K))
        assert torch.equal(rel_shift(x, K), ref)


def test_rmt_mask_matches_spec_picture():
    # keys: cache c c | read r r | tokens t t t | write w w ; queries: r r | t t t | w w
    expect = [
        '111100000',   # read: cache (xl_rmt) and all read memory, never tokens or write
        '111100000',
        '111110000',   # tokens: cache, all read memory, earlier tokens and itself
        '111111000',
        '111111100',
        '111111111',   # write: everything
        '111111111',
    ]
    mask = build_mask(2, 2, 3, 2)
    assert mask.tolist() == [[c == '1' for c in row] for row in expect]
    mt = build_mask(0, 2, 3, 0)              # MT: read block, causal tokens, no write block
    assert mt.tolist() == [[c == '1' for c in r] for r in
                           ['11000', '11000', '11100', '11110', '11111']]


def test_tokens_never_see_write_memory():
    m = tiny('rmt')
    x, mem = torch.randint(0, 12, (2, 5)), torch.randn(2, 3, 32)
    write = mem.clone().requires_grad_()
    orig = memory.read_write
    memory.read_write = lambda x_, mem_, arch: (torch.cat([mem_, x_, write], 1), 3, 3)
    try:
        logits, state = m.segment(x, memory.State(None, mem))
    finally:
        memory.read_write = orig
    logits.sum().backward(retain_graph=True)
    assert write.grad.abs().sum() == 0
    write.grad = None
    state.mem.sum().backward()
    assert write.grad.abs().sum() > 0       # the write block itself does see it


def test_bptt_depth_reaches_exactly_k_segments():
    idx = torch.randint(0, 12, (2, 20))        # 4 segments of 5
    for k in (0, 1, 2, -1):
        m = tiny('rmt', bptt_depth=k)
        g = emb_grads(m, idx, lambda out: out[:, 15:].sum())   # loss of the last segment
        reached = [s for s in range(4) if g[5 * s:5 * s + 5].sum() > 0]
        expect = list(range(4)) if k == -1 else list(range(3 - k, 4))
        assert reached == expect, (k, reached)


def test_xl_cache_is_fifo_detached_and_mem_len_long():
    m = tiny('xl', mem_len=7)
    inputs = []
    hook = m.blocks[1].register_forward_pre_hook(lambda mod, a: inputs.append(a[0]))
    out, state = m(torch.randint(0, 12, (2, 15)))   # 3 segments of 5
    hook.remove()
    seen = torch.cat(inputs, 1)                      # layer-1 inputs of all 15 positions
    assert state.cache[1].shape == (2, 7, 32)
    assert torch.equal(state.cache[1], seen[:, -7:])  # the newest 7, old first
    assert not any(c.requires_grad for c in state.cache)

# ----------------------------------------------------------------------------- data: algorithmic

def test_task_spec_values():
    assert task_spec('copy', 24) == dict(vocab_size=12, ans_len=48, score_len=48)
    assert task_spec('copy', 120) == dict(vocab_size=10, ans_len=240, score_len=240)
    assert task_spec('reverse', 40) == dict(vocab_size=12, ans_len=40, score_len=40)
    assert task_spec('retrieval', 0) == dict(vocab_size=37, ans_len=1, score_len=1)
    assert task_spec('sqeq', 0) == dict(vocab_size=24, ans_len=150, score_len=30)
    for bad in (('copy', 0), ('enwik8', 24), ('nope', 24)):
        try:
            task_spec(*bad)
            assert False, bad
        except DataError:
            pass


def test_copy_reverse_format():
    rng = np.random.default_rng(0)
    for S, V in ((24, 12), (120, 10)):
        c = generate('copy', 300, S, rng)
        assert c.shape == (300, 3 * S + 1) and c.dtype == np.int64
        row = c[0].tolist()
        assert row == row[:S] + [1] + row[:S] + row[:S]  # X ++ [1] ++ X ++ X
        x = c[:, :S]
        assert (c[:, S + 1:2 * S + 1] == x).all() and (c[:, 2 * S + 1:] == x).all()
        assert x.min() == 2 and x.max() == V - 1  # symbols are exactly ids 2..V-1
        r = generate('reverse', 300, S, rng)
        row = r[0].tolist()
        assert r.shape == (300, 2 * S + 1) and row == row[:S] + [1] + row[:S][::-1]
        assert (r[:, S] == 1).all() and (r[:, S + 1:] == r[:, S - 1::-1]).all()
    # the loss mask (last ans_len targets) covers exactly the answer
    S = 5
    c = generate('copy', 1, S, rng)
    assert (c[:, 1:][:, -task_spec('copy', S)['ans_len']:] == c[:, S + 1:]).all()


def test_retrieval_format():
    s = generate('retrieval', 500, 0, np.random.default_rng(0))
    assert s.shape == (500, 11) and s.dtype == np.int64
    for row in s.tolist():
        keys, vals, q = row[0:8:2], row[1:8:2], row[8]
        assert len(set(keys)) == 4 and all(11 <= k <= 36 for k in keys)
        assert len(set(vals)) == 4 and all(0 <= v <= 9 for v in vals)
        assert q in keys and row[9] == 10 and row[10] == vals[keys.index(q)]


def _sqeq_str(ids):
    return ''.join('_' if i == 0 else SQEQ_CHARS[i - 2] for i in ids)


def test_sqeq_text_examples():
    t = data._sqeq_text
    assert t(-4, -98, 552) == ['-4*x^2+392*x-2208=0', 'x^2-98*x+552=0', 'D=98^2-4*1*552=7396=86^2',
                               'x=(98-86)/2=6', 'x=(98+86)/2=92', '6,92']  # SPEC §5
    assert t(-1, 3, 2) == ['-x^2-3*x-2=0', 'x^2+3*x+2=0', 'D=3^2-4*1*2=1=1^2', 'x=(-3-1)/2=-2',
                           'x=(-3+1)/2=-1', '-2,-1']
    assert t(2, -10, 25)[2:] == ['D=10^2-4*1*25=0=0^2', 'x=(10-0)/2=5', 'x=(10+0)/2=5', '5']
    assert t(1, 0, -4) == ['x^2-4=0', 'x^2-4=0', 'D=0^2+4*1*4=16=4^2', 'x=(0-4)/2=-2',
                           'x=(0+4)/2=2', '-2,2']
    assert t(3, 1, 1) == ['3*x^2+3*x+3=0', 'x^2+x+1=0', 'D=1^2-4*1*1=-3', '', '', '']
    # char ids: digits 2..11, '+-*/^=()xD;,' 12..23
    assert data._SQEQ_IDS[np.frombuffer(b'09+-*/^=()xD;, ', np.uint8)].tolist() == \
        [2, 11] + list(range(12, 24)) + [0]


def test_sqeq_generated_solutions_are_right():
    s = generate('sqeq', 2000, 0, np.random.default_rng(0))
    assert s.shape == (2000, 180) and s.dtype == np.int64
    assert set(np.unique(s).tolist()) <= {0} | set(range(2, 24))

    def f(expr, x):  # value of the left-hand side at x
        return eval(expr.split('=')[0].replace('^', '**').replace('x', f'({x})'))
    n_none = 0
    for row in s.tolist():
        blocks = [_sqeq_str(row[i:i + 30]).rstrip('_') for i in range(0, 180, 30)]
        assert all('_' not in b for b in blocks)  # left-aligned, padded at the end only
        prob, canon, disc, s1, s2, ans = blocks
        k = f(prob, 0.5) / f(canon, 0.5)
        assert k == round(k) and 1 <= abs(k) <= 10 and f(prob, 3.25) == k * f(canon, 3.25)
        d = int(disc.split('=')[2])
        if ans == '':
            n_none += 1
            assert d < 0 and s1 == s2 == ''
            continue
        roots = [int(v) for v in ans.split(',')]
        assert roots == sorted(set(roots)) and len(roots) == (1 if d == 0 else 2)
        assert all(-99 <= r <= 99 and f(canon, r) == 0 for r in roots)
        assert int(s1.split('=')[-1]) == roots[0] and int(s2.split('=')[-1]) == roots[-1]
    assert 0.17 < n_none / len(s) < 0.23  # ~20% without real roots


def test_make_splits_deterministic_and_disjoint():
    sizes = dict(train=3000, val=300, test=500)
    for task, S in (('copy', 5), ('reverse', 5), ('retrieval', 0), ('sqeq', 0)):
        a, b = make_splits(task, S, 1, sizes), make_splits(task, S, 1, sizes)
        c = make_splits(task, S, 2, sizes)
        assert {k: v.shape[0] for k, v in a.items()} == sizes and a['train'].dtype == np.int64
        assert all(split_checksum(a[k]) == split_checksum(b[k]) for k in a)
        assert split_checksum(a['train']) != split_checksum(c['train'])
        rows = {k: set(map(bytes, v.astype(np.uint8))) for k, v in a.items()}
        assert all(len(rows[k]) == sizes[k] for k in rows)  # no duplicates inside a split either
        assert not (rows['train'] & rows['val'] or rows['train'] & rows['test']
                    or rows['val'] & rows['test'])
    # copy S=5 has 10^5 sequences: 3800 draws repeat some, so deduplication really ran
    raw = generate('copy', 3800, 5, np.random.default_rng(1))
    assert len(set(map(bytes, raw.astype(np.uint8)))) < 3800
    # val and test do not depend on the training size
    small = make_splits('copy', 5, 1, dict(train=100, val=300, test=500))
    a = make_splits('copy', 5, 1, sizes)
    assert np.array_equal(small['test'], a['test']) and np.array_equal(small['val'], a['val'])
    try:  # copy with S=2 has only 100 distinct sequences
        make_splits('copy', 2, 0, (100, 10, 10))
        assert False
    except DataError:
        pass


def test_examples_rank_split_equals_one_process():
    seqs = make_splits('copy', 4, 0, (50, 5, 5))['train']  # 50 rows of length 13
    one = Examples(seqs, 8, 8, seed=3)
    ranks = [Examples(seqs, 8, 4, rank=r, world=2, seed=3) for r in (0, 1)]
    for i in range(14):  # 6 global batches per epoch: crosses two epoch boundaries
        x, y, w = one.batch(i)
        parts = [e.batch(i) for e in ranks]
        for j in range(3):
            assert torch.equal((x, y, w)[j], torch.cat([p[j] for p in parts]))
        assert x.shape == y.shape == w.shape == (8, 12)
        assert x.dtype == y.dtype == torch.int64 and w.dtype == torch.float32
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert (w[:, -8:] == 1).all() and (w[:, :-8] == 0).all()
    epoch = torch.cat([one.batch(i)[0] for i in range(6)])
    assert len({tuple(r) for r in epoch.tolist()}) == 48  # no example twice in an epoch
    assert not torch.equal(one.batch(0)[0], one.batch(6)[0])  # a new order each epoch
    shares = [torch.cat([b[1] for b in e.eval_batches(3)]) for e in ranks]
    assert torch.equal(shares[0], torch.from_numpy(seqs[0::2, 1:]))
    assert torch.equal(shares[1], torch.from_numpy(seqs[1::2, 1:]))
    assert sum(len(b[0]) for b in ranks[1].eval_batches(4, max_examples=7)) == 3


# ----------------------------------------------------------------------------- data: LM

def test_stream_contiguous_and_rank_disjoint():
    tokens = np.arange(1000, dtype=np.int32)  # token = position, so continuity is visible
    B, W, n = 3, 7, 1000 // 6
    seen = []
    for r in (0, 1):
        s = Stream(tokens, B, W, rank=r, world=2)
        starts = torch.arange(r * B, r * B + B) * n
        prev, got = None, []
        for t in range(30):  # (n - 1) // W = 23 windows, then it wraps
            x, y = s.next()
            assert x.shape == y.shape == (B, W) and x.dtype == torch.int64
            assert torch.equal(y, x + 1)
            if t == 0 or t == 23:
                assert torch.equal(x[:, 0], starts)  # start, and the wrap back to the start
            else:
                assert torch.equal(x[:, 0], prev[:, -1] + 1)  # row b continues row b
            prev = x
            if t < 23:
                got.append(x)
        seen.append(set(torch.cat(got, 1).flatten().tolist()))
        state = s.state_dict()
        s2 = Stream(tokens, B, W, rank=r, world=2)
        s2.load_state_dict(state)
        assert torch.equal(s2.next()[0], s.next()[0])  # resume continues exactly
        ev = list(s.eval_windows(10))
        assert [e[0].shape[1] for e in ev] == [10] * 16 + [5]  # the last window is shorter
        assert torch.equal(torch.cat([e[0] for e in ev], 1)[:, 0], starts)
        assert torch.equal(torch.cat([e[1] for e in ev], 1)[:, -1], starts + n - 1)
        capped = sum(e[0].numel() for e in s.eval_windows(10, max_tokens=50))
        assert 50 <= capped < 50 + B
    assert not seen[0] & seen[1]  # ranks own disjoint streams


def _zip(path, files, method=zipfile.ZIP_DEFLATED):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with zipfile.ZipFile(path, 'w', method) as z:
        for name, content in files.items():
            z.writestr(name, content)


def test_enwik8_prepare_fake_zip():
    raw = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    old = data.ENWIK8_SIZE, data.ENWIK8_URL
    with tempfile.TemporaryDirectory() as d:
        try:
            data.ENWIK8_SIZE, data.ENWIK8_URL = 2000, 'file:///nonexistent/enwik8.zip'  # offline
            _zip(f'{d}/enwik8/enwik8.zip', {'enwik8': raw})
            c = load_corpus('enwik8', d)
            assert (len(c.train), len(c.val), len(c.test)) == (1800, 100, 100)  # 90/5/5
            assert c.train.dtype == np.uint8 and c.vocab_size == 256 and c.cutoffs is None
            assert bytes(c.train) + bytes(c.val) + bytes(c.test) == raw  # every byte, in order
            assert os.path.exists(f'{d}/enwik8/meta.json')
            os.remove(f'{d}/enwik8/enwik8.zip')  # once prepared, the zip is not needed
            assert bytes(load_corpus('enwik8', d).test) == raw[-100:]
            with open(f'{d}/enwik8/val.bin', 'ab') as f:  # a damaged split means "not prepared"
                f.write(b'x')
            try:
                load_corpus('enwik8', d)
                assert False
            except DataError as e:
                assert 'could not download' in str(e)
        finally:
            data.ENWIK8_SIZE, data.ENWIK8_URL = old


def test_enwik8_bad_zip_rejected():
    raw = np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w', zipfile.ZIP_STORED) as z:
        z.writestr('enwik8', raw)
    good = buf.getvalue()
    corrupt = bytearray(good)
    corrupt[500] ^= 0xFF  # inside the stored data: the CRC check fails
    short = io.BytesIO()
    with zipfile.ZipFile(short, 'w') as z:
        z.writestr('enwik8', raw[:1000])
    other = io.BytesIO()
    with zipfile.ZipFile(other, 'w') as z:
        z.writestr('enwik9', raw)
    old = data.ENWIK8_SIZE, data.ENWIK8_URL
    try:
        data.ENWIK8_SIZE, data.ENWIK8_URL = 2048, 'file:///nonexistent/enwik8.zip'
        for name, content in (('truncated', good[:len(good) // 2]), ('corrupt', bytes(corrupt)),
                              ('short', short.getvalue()), ('member', other.getvalue()),
                              ('missing', None)):
            with tempfile.TemporaryDirectory() as d:
                zpath = os.path.join(d, 'enwik8', 'enwik8.zip')
                os.makedirs(os.path.dirname(zpath))
                if content is not None:
                    with open(zpath, 'wb') as f:
                        f.write(content)
                try:
                    load_corpus('enwik8', d)
                    assert False, name
                except DataError as e:
                    msg = str(e)
                    assert zpath in msg and data.ENWIK8_URL in msg and '\n' not in msg, msg
                left = set(os.listdir(os.path.dirname(zpath)))
                assert left == (set() if content is None else {'enwik8.zip'}), (name, left)
    finally:
        data.ENWIK8_SIZE, data.ENWIK8_URL = old


def test_wt103_tiny_corpus():
    train = ' = Title = \n\n\n the cat sat on the mat \n the dog <unk> the \n'
    old = os.environ.get('WT103_URL')
    os.environ['WT103_URL'] = 'file:///nonexistent/wt103.zip'  # the zip below is used instead
    try:
        with tempfile.TemporaryDirectory() as d:
            _zip(f'{d}/wt103/wikitext-103-v1.zip', {
                'wikitext-103/wiki.train.tokens': train,
                'wikitext-103/wiki.valid.tokens': ' the bird sat \n',
                'wikitext-103/wiki.test.tokens': ' the cat \n'})
            with contextlib.redirect_stdout(io.StringIO()):
                c = load_corpus('wt103', d)
            # <eos> once per line (5, empty lines too), 'the' 4, '=' 2, ties by first occurrence
            assert c.itos == ['<eos>', 'the', '=', 'Title', 'cat', 'sat', 'on', 'mat', 'dog',
                              '<unk>']
            assert c.vocab_size == 10 and c.cutoffs is None and c.train.dtype == np.int32
            assert c.train.tolist() == [2, 3, 2, 0, 0, 0, 1, 4, 5, 6, 1, 7, 0, 1, 8, 9, 1, 0]
            assert c.val.tolist() == [1, 9, 5, 0]  # 'bird' is not in the vocabulary: <unk>
            assert c.test.tolist() == [1, 4, 0]
            assert c.decode(c.val) == 'the <unk> sat\n'
            assert c.encode('the cat\nsat').tolist() == [1, 4, 0, 5]
            counts = np.bincount(c.train, minlength=c.vocab_size)
            assert (np.diff(counts) <= 0).all()  # ids sorted by training frequency
        with tempfile.TemporaryDirectory() as d:  # no <unk> in train: it is added
            _zip(f'{d}/wt103/wikitext-103-v1.zip', {
                'wikitext-103/wiki.train.tokens': 'a b a\n',
                'wikitext-103/wiki.valid.tokens': 'c a\n', 'wikitext-103/wiki.test.tokens': 'b\n'})
            with contextlib.redirect_stdout(io.StringIO()):
                c = load_corpus('wt103', d)
            assert c.itos == ['a', 'b', '<eos>', '<unk>'] and c.val.tolist() == [3, 0, 2]
    finally:
        if old is None:
            os.environ.pop('WT103_URL')
        else:
            os.environ['WT103_URL'] = old


def test_text_corpus_and_cli():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, 'my.txt')
        raw = 'héllo wörld\n'.encode() * 100  # 1400 bytes
        with open(path, 'wb') as f:
            f.write(raw)
        c = load_corpus('text', os.path.join(d, 'data'), path)
        assert (len(c.train), len(c.val), len(c.test)) == (1260, 70, 70)
        assert bytes(c.train) + bytes(c.val) + bytes(c.test) == raw and c.vocab_size == 256
        assert c.decode(c.encode('héllo')) == 'héllo' and c.decode([255]) == '\ufffd'
        assert os.listdir(d) == ['my.txt']  # read in place, nothing written
        open(os.path.join(d, 'empty.txt'), 'wb').close()
        for bad in (None, os.path.join(d, 'nope.txt'), os.path.join(d, 'empty.txt')):
            try:
                load_corpus('text', d, bad)
                assert False, bad
            except DataError:
                pass
        out, argv = io.StringIO(), sys.argv
        try:
            sys.argv = ['data.py', 'text', path]
            with contextlib.redirect_stdout(out):
                runpy.run_path(data.__file__, run_name='__main__')
        finally:
            sys.argv = argv
        assert 'train 1,260 val 70 test 70' in out.getvalue()


def test_data_cli_error_exit_code():
    p = subprocess.run([sys.executable, data.__file__, 'text', '/nonexistent/file.txt'],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count('\n') == 1 and 'data_path' in p.stderr


class _FakeResponse:
    """urlopen stand-in: announces `total` bytes, sends `chunks`, then fails or ends."""
    def __init__(self, total, chunks, error=None):
        self.headers, self.chunks, self.error = {'Content-Length': str(total)}, list(chunks), error

    def read(self, n):
        if self.chunks:
            return self.chunks.pop(0)
        if self.error:
            raise self.error
        return b''

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_download_is_all_or_nothing():
    real = data.urllib.request.urlopen
    cases = [(100, [b'x' * 60], None),  # connection closed early
             (100, [b'x' * 60], ConnectionResetError('reset')),  # failed mid-way
             (100, [b'x' * 60], http.client.IncompleteRead(b''))]
    try:
        with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(io.StringIO()):
            path = os.path.join(d, 'f.zip')
            for total, chunks, error in cases:
                data.urllib.request.urlopen = lambda *a, **k: _FakeResponse(total, chunks, error)
                try:
                    data._download('http://example.invalid/f.zip', path)
                    assert False
                except DataError as e:
                    assert path in str(e) and 'http://example.invalid/f.zip' in str(e)
                assert os.listdir(d) == []  # no partial file, under any name
            data.urllib.request.urlopen = lambda *a, **k: _FakeResponse(100, [b'x' * 60, b'y' * 40])
            data._download('http://example.invalid/f.zip', path)
            assert os.listdir(d) == ['f.zip'] and open(path, 'rb').read() == b'x' * 60 + b'y' * 40
    finally:
        data.urllib.request.urlopen = real


# ----------------------------------------------------------------------------- metrics, learning


class CopyOracle(MemTransformer):
    """Always right on copy's answer: its 'memory' is every token seen so far, so free-running
    generation must carry it across segments exactly as teacher forcing does."""

    def segment(self, idx, state=None, targets=None):
        S = (self.cfg.seq_len_for_test)
        hist = idx if state is None else torch.cat([state.mem, idx], 1)
        p = torch.arange(hist.size(1) - idx.size(1), hist.size(1))    # positions of idx
        nxt = hist[:, (p - S).clamp(min=0) % S]                         # copy from the source
        nxt[:, p + 1 == S] = 1
        logits = torch.nn.functional.one_hot(nxt, self.cfg.vocab_size).float()
        return logits, memory.State(None, hist)


def test_free_running_equals_teacher_forced_when_always_right():
    S = 7
    seqs = generate('copy', 16, S, np.random.default_rng(0))
    oracle = tiny('rmt', seg_len=5)
    oracle.__class__ = CopyOracle
    oracle.cfg.seq_len_for_test = S
    x, y, w = Examples(seqs, 2 * S, 16).batch(0)
    nll, n, n_ans, tf, fr, em = data.answer_metrics(oracle, x, y, w, 2 * S, 2 * S)
    assert n_ans == 16 * 2 * S and tf == fr == n_ans and em == 16


def train_tiny(arch, steps=500):
    torch.manual_seed(0)
    m = tiny(arch, seg_len=4, n_mem_tokens=2, d_model=64, d_head=32, d_inner=128)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    for _ in range(steps):        # copy S=4 in 3 segments of 4: the answer needs memory
        x, y, w = Examples(generate('copy', 64, 4, rng), 8, 64).batch(0)
        nll, _ = m(x, None, y)
        opt.zero_grad()
        ((nll * w).sum() / w.sum()).backward()
        opt.step()
    m.eval()
    x, y, w = Examples(generate('copy', 256, 4, rng), 8, 256).batch(0)
    res = data.answer_metrics(m, x, y, w, 8, 8)
    return res[4] / res[2]


def test_tiny_rmt_learns_copy_that_baseline_cannot():
    rmt, base = train_tiny('rmt'), train_tiny('baseline', steps=100)
    assert rmt > 0.9 and base < 0.3, (rmt, base)


def test_ddp_two_processes_equal_one_process():
    with tempfile.TemporaryDirectory() as d:
        common = ['--dropout', '0', '--max_iters', '3', '--eval_interval', '3',
                  '--eval_examples', '8', '--device', 'cpu', '--n_layer', '2']
        r1 = run('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
                 *common, '--batch_size', '4', '--out_dir', f'{d}/ddp')
        r2 = run('train.py', *common, '--batch_size', '8', '--out_dir', f'{d}/one')
        assert r1.returncode == 0 and r2.returncode == 0, r1.stderr[-2000:] + r2.stderr[-2000:]
        a = torch.load(f'{d}/ddp/ckpt.pt', weights_only=True)['model']
        b = torch.load(f'{d}/one/ckpt.pt', weights_only=True)['model']
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


# ----------------------------------------------------------------------------- language modelling


def test_adaptive_softmax_log_probs_normalised_and_loss_matches():
    m = tiny('xl', vocab_size=50, cutoffs=(10, 30))
    x, y = torch.randint(0, 50, (2, 10)), torch.randint(0, 50, (2, 10))
    logp, _ = m(x)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(2, 10), atol=1e-5)
    nll, _ = m(x, None, y)
    assert torch.allclose(nll, -logp.gather(-1, y[..., None])[..., 0], atol=1e-5)


def test_uniform_model_has_8_bpc_and_eval_reports_protocol():
    from dataclasses import asdict
    from train import TrainConfig
    with tempfile.TemporaryDirectory() as d:
        with open(f'{d}/corpus.txt', 'wb') as f:
            f.write(bytes(np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8)))
        cfg = ModelConfig(arch='xl', vocab_size=256, n_layer=1, d_model=16, n_head=2, d_head=8,
                          d_inner=32, seg_len=16, mem_len=16, bptt_depth=0)
        m = MemTransformer(cfg)
        torch.nn.init.zeros_(m.tok_emb.weight)         # every logit 0: uniform over 256 bytes
        tc = TrainConfig(task='text', data_path=f'{d}/corpus.txt', batch_size=4)
        torch.save(dict(model=m.state_dict(), model_cfg=asdict(cfg), train_cfg=asdict(tc)),
                   f'{d}/u.pt')
        r = run('train.py', '--mode', 'eval', '--init_from', f'{d}/u.pt', '--mem_len', '48',
                '--eval_tokens', '640')
        assert r.returncode == 0, r.stderr
        assert 'mem_len 48' in r.stdout and 'seg_len 16' in r.stdout, r.stdout
        for line in r.stdout.splitlines()[1:]:
            assert 'bpc 8.0000' in line and 'n 640' in line, r.stdout


def test_sampling_length_and_seed_determinism():
    m = tiny('rmt', vocab_size=40).eval()
    outs = []
    for _ in range(2):
        torch.manual_seed(1)
        outs.append(m.generate(torch.tensor([[3, 4, 5]]), 17, temperature=0.9, top_k=5))
    assert outs[0].shape == (1, 17) and torch.equal(outs[0], outs[1])


# ----------------------------------------------------------------------------- command line


def test_bad_flags_exit_2_with_one_line():
    for args in (['--nope', '1'], ['--arch', 'gpt'], ['--task', 'nope'], ['--lr', 'fast'],
                 ['--arch', 'rmt', '--n_mem_tokens', '0'], ['--arch', 'mt', '--n_mem_tokens=0'],
                 ['--arch', 'xl', '--mem_len', '0'], ['--seg_len', '0'], ['--seq_len', '0'],
                 ['--init_from', '/nonexistent.pt']):
        r = run('train.py', *args)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and 'Traceback' not in r.stderr, r.stderr


# ----------------------------------------------------------------------------- runner

if __name__ == '__main__':
    torch.set_num_threads(min(2, torch.get_num_threads()))
    tests = [(n, f) for n, f in list(globals().items()) if n.startswith('test_') and callable(f)]
    passed = failed = 0
    t_all = time.time()
    for name, fn in tests:
        t0 = time.time()
        try:
            fn()
            passed += 1
            print(f'PASS {name} ({time.time() - t0:.1f}s)', flush=True)
        except Exception:
            failed += 1
            print(f'FAIL {name} ({time.time() - t0:.1f}s)\n{traceback.format_exc()}', flush=True)
    print(f'total {time.time() - t_all:.0f}s')
    print(f'{passed} passed, {failed} failed')
    sys.exit(1 if failed else 0)
