"""Data for all six tasks of the RMT and TRAMS papers. Algorithmic tasks are generated from a
seed and served by `Examples`; language-modelling corpora are prepared once into flat token files
and served by `Stream`, Transformer-XL's ordered iterator. `python data.py enwik8|wt103|text FILE`
prepares one.
"""
import array
import hashlib
import http.client
import io
import json
import math
import os
import re
import sys
import time
import urllib.request
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

ALGO_TASKS = ('copy', 'reverse', 'retrieval', 'sqeq')
LM_TASKS = ('enwik8', 'wt103', 'text')


class DataError(Exception):
    """A data problem the user can fix; the one-line message names the fix."""


PROGRESS_SECONDS = 10.0   # long work (data preparation, evaluation) reports this often


class Progress:
    """On long work, a line on stderr every PROGRESS_SECONDS: what, done / total, elapsed and
    the time left at the rate so far (quiet where active is False: ranks other than 0)."""

    def __init__(self, what, total, active=True):
        self.what, self.total, self.active, self.done = what, total, active, 0
        self.t0 = self.last = time.time()

    def update(self, more):  # called before each piece of work: reports what is done so far
        now = time.time()
        if self.active and now - self.last >= PROGRESS_SECONDS and self.done:
            elapsed = now - self.t0
            left = elapsed * (self.total - self.done) / self.done
            print(f'{self.what}: {self.done} / {self.total} done, {elapsed:.0f} s, about '
                  f'{left:.0f} s left', file=sys.stderr, flush=True)
            self.last = now
        self.done += more


def _shifted(rows):
    """(B, w+1) token rows -> int64 tensors x, y (B, w): y is x shifted by one token."""
    t = torch.from_numpy(np.array(rows, dtype=np.int64))
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


# ----------------------------------------------------------------------------- algorithmic tasks

def task_spec(task, seq_len):
    """vocab_size, ans_len (trailing targets with loss, generated), score_len (scored targets)."""
    if task in ('copy', 'reverse'):
        if seq_len < 1:
            raise DataError(f'--seq_len must be >= 1 for {task}, got {seq_len}')
        ans = 2 * seq_len if task == 'copy' else seq_len
        return dict(vocab_size=12 if seq_len <= 40 else 10, ans_len=ans, score_len=ans)
    if task == 'retrieval':
        return dict(vocab_size=37, ans_len=1, score_len=1)
    if task == 'sqeq':  # loss on the whole worked solution, exact match on the answer block only
        return dict(vocab_size=24, ans_len=150, score_len=30)
    raise DataError(f'unknown algorithmic task {task!r}: use one of {", ".join(ALGO_TASKS)}')


SQEQ_CHARS = '0123456789+-*/^=()xD;,'  # ids 2..23 in this order; 0 pads, 1 is unused
_SQEQ_IDS = np.zeros(256, np.int64)  # ascii byte -> id; the padding space maps to 0
_SQEQ_IDS[np.frombuffer(SQEQ_CHARS.encode(), np.uint8)] = np.arange(2, 24)


def _poly(*coefs):
    """'a*x^2+b*x+c=0': a coefficient of 1 before a variable is omitted, zero terms vanish."""
    out = ''
    for coef, var in zip(coefs, ('x^2', 'x', '')):
        if coef:
            body = (var if abs(coef) == 1 else f'{abs(coef)}*{var}') if var else str(abs(coef))
            out += ('-' if coef < 0 else '+' if out else '') + body
    return out + '=0'


def _sqeq_text(k, b, c):
    """The six blocks for k * (x^2 + b*x + c) = 0; k=-4, b=-98, c=552 gives -4*x^2+392*x-2208=0 |
    x^2-98*x+552=0 | D=98^2-4*1*552=7396=86^2 | x=(98-86)/2=6 | x=(98+86)/2=92 | 6,92."""
    d = b * b - 4 * c
    disc = f'D={abs(b)}^2{"-" if c >= 0 else "+"}4*1*{abs(c)}={d}'
    if d < 0:  # no real roots: root steps and answer stay empty (all padding)
        return [_poly(k, k * b, k * c), _poly(1, b, c), disc, '', '', '']
    s = math.isqrt(d)  # exact: d = (r1 - r2)^2 for integer roots
    r1, r2 = (-b - s) // 2, (-b + s) // 2
    return [_poly(k, k * b, k * c), _poly(1, b, c), f'{disc}={s}^2', f'x=({-b}-{s})/2={r1}',
            f'x=({-b}+{s})/2={r2}', f'{r1}' if r1 == r2 else f'{r1},{r2}']


def generate(task, n, seq_len, rng):
    """n full sequences (n, L) int64 in the formats of the RMT paper's experiments (README,
    Tasks); input = seq[:, :-1], target = seq[:, 1:]."""
    spec = task_spec(task, seq_len)  # validates task and seq_len
    if task in ('copy', 'reverse'):  # X ++ [1] ++ X ++ X  or  X ++ [1] ++ reversed(X)
        x = rng.integers(2, spec['vocab_size'], (n, seq_len))
        start = np.ones((n, 1), np.int64)
        return np.concatenate([x, start, x, x] if task == 'copy' else [x, start, x[:, ::-1]], 1)
    if task == 'retrieval':  # k1 v1 .. k4 v4 q 10 v_q: distinct letter keys 11..36, digit values
        keys = np.argsort(rng.random((n, 26)), axis=1)[:, :4] + 11
        vals = np.argsort(rng.random((n, 10)), axis=1)[:, :4]
        q, rows = rng.integers(0, 4, n), np.arange(n)
        seq = np.empty((n, 11), np.int64)
        seq[:, 0:8:2], seq[:, 1:8:2] = keys, vals
        seq[:, 8], seq[:, 9], seq[:, 10] = keys[rows, q], 10, vals[rows, q]
        return seq
    # sqeq, six 30-char blocks: 80% with integer roots in [-99, 99], 20% with b^2 - 4c < 0
    k = rng.integers(1, 11, n) * rng.choice([-1, 1], n)
    r = rng.integers(-99, 100, (n, 2))
    b, c = -r.sum(1), r[:, 0] * r[:, 1]
    # no roots: b, c in the range of the real cases (|b| < 198, c <= 99^2) with b^2 - 4c < 0
    none = rng.random(n) < 0.2
    bn = rng.integers(-197, 198, n)
    cn = rng.integers(bn * bn // 4 + 1, 9802)
    b, c = np.where(none, bn, b), np.where(none, cn, c)
    text = ''.join(''.join(block.ljust(30) for block in _sqeq_text(*kbc))
                   for kbc in zip(k.tolist(), b.tolist(), c.tolist()))
    return _SQEQ_IDS[np.frombuffer(text.encode(), np.uint8)].reshape(n, 180)


def make_splits(task, seq_len, seed, sizes=None):
    """{'train', 'val', 'test'} -> (N, L) int64, deterministic from seed, no row in two splits."""
    sizes = sizes or ((100_000, 10_000, 20_000) if task == 'sqeq' else (100_000, 5_000, 10_000))
    n = sizes if isinstance(sizes, dict) else dict(zip(('train', 'val', 'test'), sizes))  # or tuple
    total, rng, rows = sum(n.values()), np.random.default_rng(seed), {}
    if task in ('copy', 'reverse'):  # rows of seq_len + 1 + answer: refuse what memory cannot hold
        need = (total + 8192) * (seq_len + 1 + task_spec(task, seq_len)['ans_len']) * 9  # bytes
        if hasattr(os, 'sysconf') and need > os.sysconf('SC_PAGE_SIZE') * os.sysconf(
                'SC_PHYS_PAGES') / 2:
            raise DataError(f'--seq_len {seq_len}: the {task} splits would need {need / 2**30:.0f}'
                            " GiB, over half this machine's memory: lower --seq_len")
    # Fixed-size chunks keep the first rows (test, then val) independent of the sizes; a dict keeps
    # each distinct row once, in first-occurrence order, so no split repeats another's example.
    while len(rows) < total:
        chunk = generate(task, 8192, seq_len, rng).astype(np.uint8)  # every id < 256
        before = len(rows)
        rows.update(dict.fromkeys(chunk.view(f'V{chunk.shape[1]}').ravel().tolist()))  # row bytes
        if len(rows) == before:
            raise DataError(f'{task} with seq_len {seq_len} has fewer than {total} distinct '
                            'examples: lower the split sizes or raise --seq_len')
    data = np.frombuffer(b''.join(list(rows)[:total]), np.uint8).reshape(total, -1).astype(np.int64)
    t, v = n['test'], n['test'] + n['val']
    return {'test': data[:t], 'val': data[t:v], 'train': data[v:]}


def split_checksum(arr):
    """Short digest of all of a split's tokens (about 0.05 s per 100 MB), stored in checkpoints
    and checked on resume: another data set is caught even when its length is the same."""
    return hashlib.sha1(memoryview(np.ascontiguousarray(arr))).hexdigest()[:12]


class Examples:
    """Batches (x, y, w) of fixed-length examples. Global batch i is world*B entries of a per-epoch
    permutation, rank r takes the r-th B: together the ranks see a 1-process run with world*B."""

    def __init__(self, seqs, ans_len, batch_size, rank=0, world=1, seed=0):
        self.seqs, self.B, self.rank, self.world, self.seed = seqs, batch_size, rank, world, seed
        self.steps_per_epoch = len(seqs) // (world * batch_size)  # ragged tail skipped per epoch
        if self.steps_per_epoch == 0:
            raise DataError(f'{len(seqs)} examples cannot fill one batch of {world} x '
                            f'{batch_size}: lower batch_size')
        self.w = np.zeros(seqs.shape[1] - 1, np.float32)
        self.w[-ans_len:] = 1  # loss only on the answer
        self._epoch, self._perm = None, None

    def _xyw(self, rows):
        return *_shifted(rows), torch.from_numpy(np.tile(self.w, (len(rows), 1)))

    def batch(self, i):
        """Micro-batch i (a global counter): int64 x, y and float32 w, each (B, L-1)."""
        epoch, j = divmod(i, self.steps_per_epoch)
        if epoch != self._epoch:  # the permutation depends on (seed, epoch) only: resumable
            rng = np.random.default_rng((self.seed, epoch))
            self._epoch, self._perm = epoch, rng.permutation(len(self.seqs))
        start = (j * self.world + self.rank) * self.B
        return self._xyw(self.seqs[self._perm[start:start + self.B]])

    def state_dict(self):  # nothing to keep: batches are indexed by the step
        return {}

    def load_state_dict(self, d):
        pass

    def eval_size(self, max_examples=None):  # examples eval_batches yields on this rank
        return len(self.seqs[:max_examples][self.rank::self.world])

    def eval_batches(self, batch_size, max_examples=None):
        """This rank's share (rows rank::world of the first max_examples) in order."""
        mine = self.seqs[:max_examples][self.rank::self.world]
        for s in range(0, len(mine), batch_size):
            yield self._xyw(mine[s:s + batch_size])


def answer_metrics(model, x, y, w, ans_len, score_len):
    """Sums to add up over batches and ranks: [answer NLL, answer tokens, scored tokens,
    teacher-forced correct (argmax after the true prefix), free-running correct (greedy generation
    of the answer, memory carried, no ground truth fed back), exact matches (all scored right),
    empty answers (all padding: sqeq without a real root), exact matches among them]."""
    logits, _ = model(x)                                                         # (B, T, V)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction='none')
    gen = model.generate(x[:, :x.size(1) - ans_len + 1], ans_len)               # (B, A)
    S = score_len
    free = gen[:, -S:] == y[:, -S:]
    exact, empty = free.all(1), (y[:, -S:] == 0).all(1)                         # (B,)
    return [(nll * w).sum().item(), w.sum().item(), free.numel(),
            (logits[:, -S:].argmax(-1) == y[:, -S:]).sum().item(), free.sum().item(),
            exact.sum().item(), empty.sum().item(), (exact & empty).sum().item()]


def show_example(task, ids):
    """Token ids of an algorithmic example as text a reader can check. copy, reverse: symbols
    2.. as digits 0.., the start token 1 as '|'; retrieval: keys 11..36 as letters a..z, values
    0..9 as digits, the separator 10 as '?'; sqeq: its characters, padding as '_'."""
    ids = [int(i) for i in ids]
    if task == 'sqeq':
        return ''.join('_' if i < 2 else SQEQ_CHARS[i - 2] for i in ids)
    if task == 'retrieval':
        chars = '0123456789?abcdefghijklmnopqrstuvwxyz'       # ids 0..36
        return ''.join(chars[i] for i in ids)
    return ''.join('|' if i == 1 else str(i - 2) for i in ids)


# ----------------------------------------------------------------------------- language modelling

ENWIK8_URL = 'http://mattmahoney.net/dc/enwik8.zip'
ENWIK8_SIZE = 100_000_000  # bytes of the unzipped file (tests patch it for a small fake)
WT103_URL = 'https://wikitext.smerity.com/wikitext-103-v1.zip'  # the env var WT103_URL overrides
WT103_CUTOFFS = [20000, 40000, 200000]  # adaptive softmax clusters of Transformer-XL on wt103
SPLITS = ('train', 'val', 'test')


@dataclass
class Corpus:
    """Token ids of the three splits (memmaps: read only when used) and the vocabulary."""
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    vocab_size: int
    cutoffs: list | None = None  # adaptive softmax cutoffs; None = plain softmax
    itos: list | None = None  # id -> word for word-level corpora; None = bytes

    def encode(self, text):
        """Token ids of text: its UTF-8 bytes, or its words, each of which the vocabulary must
        hold (DataError otherwise: the data's own unknown word is spelled <unk>)."""
        if self.itos is None:
            # surrogateescape: bytes that are no UTF-8 (a shell's $'\xff') come back as bytes
            ids = np.frombuffer(text.encode('utf-8', 'surrogateescape'), np.uint8).astype(np.int64)
        else:
            stoi = {w: i for i, w in enumerate(self.itos)}
            words = text.replace('\n', ' <eos> ').split()  # a newline ends a line, as in training
            unknown = [w for w in words if w not in stoi]
            if unknown:
                raise DataError(f"'{unknown[0]}' is not in the vocabulary ({len(unknown)} unknown "
                                'words): use other words, or <unk>')
            ids = np.array([stoi[w] for w in words], np.int64)
        if len(ids) == 0:
            raise DataError('the text holds no token: give at least one character or word')
        return ids

    def decode(self, ids):
        ids = np.asarray(ids.cpu() if torch.is_tensor(ids) else ids).reshape(-1)
        if self.itos is None:
            return bytes(ids.astype(np.uint8)).decode('utf-8', errors='replace')
        return re.sub(r' ?<eos> ?', '\n', ' '.join(self.itos[i] for i in ids.tolist()))


def _download(url, path):
    """Fetch url to path (unless there already) through path.part, renamed only when complete:
    an interrupted download never passes for the real file."""
    if os.path.exists(path):
        return
    tmp = path + '.part'
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, 'wb') as f:
            total, done = int(r.headers.get('Content-Length') or 0), 0
            while chunk := r.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                print(f'\rdownloading {url}: {done >> 20} / {total >> 20} MB', end='', flush=True)
        print()
        if total and done != total:
            raise OSError(f'connection closed after {done} of {total} bytes')
    except (OSError, http.client.HTTPException, ValueError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise DataError(f'could not download {url} ({e}): put the file at {path} by hand') from None
    os.replace(tmp, path)


def _damaged(zpath, url, why):
    return DataError(f'{zpath} {why}: delete it and rerun, or download {url} by hand to {zpath}')


def _zip_lines(zpath, member, url, text):
    """Lines (str if text else bytes) of a zip member, read lazily: wiki.train.tokens is 0.5 GB."""
    try:
        with zipfile.ZipFile(zpath) as zf, zf.open(member) as f:
            progress = Progress(f'reading {member} (bytes)', zf.getinfo(member).file_size)
            for line in io.TextIOWrapper(f, encoding='utf-8') if text else f:
                progress.update(len(line))       # characters for text: near enough
                yield line
    except (zipfile.BadZipFile, KeyError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise _damaged(zpath, url, f'is damaged or not the expected archive ({e})') from None


def _split_90_5_5(ids):  # views, no copies
    return np.split(ids, [len(ids) - 2 * (len(ids) // 20), len(ids) - len(ids) // 20])


def _load_meta(out):
    """meta.json if every split it lists is on disk with the listed size, else None."""
    try:
        with open(os.path.join(out, 'meta.json')) as f:
            meta = json.load(f)
        size = np.dtype(meta['dtype']).itemsize
        return meta if all(os.path.getsize(os.path.join(out, f'{s}.bin')) == meta['sizes'][s] * size
                           for s in SPLITS) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare(task, data_dir='data', data_path=None):
    """Download (a zip put in data_dir/task by hand is used as is), verify, split and store a
    corpus under data_dir/task, unless done already; returns its meta."""
    if task == 'text':  # nothing to store: the file is read in place, this only checks it
        load_corpus(task, data_dir, data_path)
        return None
    if task not in LM_TASKS:
        raise DataError(f'unknown language-modelling task {task!r}: use one of {LM_TASKS}')
    out, mpath = os.path.join(data_dir, task), os.path.join(data_dir, task, 'meta.json')
    if (meta := _load_meta(out)) is not None:
        return meta
    os.makedirs(out, exist_ok=True)
    if os.path.exists(mpath):  # stale: must not vouch for the new files while they are written
        os.remove(mpath)
    url = ENWIK8_URL if task == 'enwik8' else os.environ.get('WT103_URL', WT103_URL)
    zpath = os.path.join(out, 'enwik8.zip' if task == 'enwik8' else 'wikitext-103-v1.zip')
    _download(url, zpath)
    if task == 'enwik8':
        raw = b''.join(_zip_lines(zpath, 'enwik8', url, text=False))
        if len(raw) != ENWIK8_SIZE:
            raise _damaged(zpath, url, f'unzips to {len(raw):,} bytes, not {ENWIK8_SIZE:,}')
        splits, vocab_size = dict(zip(SPLITS, _split_90_5_5(np.frombuffer(raw, np.uint8)))), 256
    else:
        members = {s: f'wikitext-103/wiki.{s.replace("val", "valid")}.tokens' for s in SPLITS}
        # Transformer-XL tokenisation: line.split() + ['<eos>'] for every line, empty ones
        # included; ids by descending training frequency (ties: first seen) for adaptive softmax.
        print(f'building the vocabulary from {members["train"]}')
        counts = Counter()
        for line in _zip_lines(zpath, members['train'], url, text=True):
            counts.update(line.split())
            counts['<eos>'] += 1
        counts.setdefault('<unk>', 0)  # WikiText has <unk> already; OOV words in val/test need it
        itos = [w for w, _ in counts.most_common()]
        stoi = {w: i for i, w in enumerate(itos)}
        unk, eos, splits, vocab_size = stoi['<unk>'], stoi['<eos>'], {}, len(itos)
        for split, member in members.items():
            print(f'encoding {member}')
            ids = array.array('i')  # 4 bytes per id: 103M ids as a Python list would need ~4 GB
            for line in _zip_lines(zpath, member, url, text=True):
                ids.extend([stoi.get(w, unk) for w in line.split()] + [eos])
            splits[split] = np.frombuffer(ids, np.intc)  # C int: int32 on every common platform
        with open(os.path.join(out, 'vocab.txt'), 'w', encoding='utf-8') as f:
            f.write(''.join(w + '\n' for w in itos))
    for split, ids in splits.items():
        ids.tofile(os.path.join(out, f'{split}.bin'))
    # meta.json goes last and atomically: it marks the directory as complete
    with open(mpath + '.tmp', 'w') as f:
        json.dump(dict(task=task, vocab_size=vocab_size, source=url, dtype=str(ids.dtype),
                       sizes={s: len(ids) for s, ids in splits.items()}), f, indent=1)
    os.replace(mpath + '.tmp', mpath)
    return _load_meta(out)


def load_corpus(task, data_dir='data', data_path=None):
    """The corpus as memmaps, prepared on first use. File system errors (an unreadable file, a
    data_dir that cannot be written, a full disk) end as one-line DataErrors."""
    try:
        return _open_corpus(task, data_dir, data_path)
    except OSError as e:
        raise DataError(f'{e.filename or data_dir}: {e.strerror}: fix the path or its '
                        'permissions, or free disk space') from None


def _open_corpus(task, data_dir, data_path):
    if task == 'text':  # a local file as bytes, no copy: the splits are views at 90/5/5 offsets
        if not data_path or not os.path.isfile(data_path):
            raise DataError(f'--task text needs --data_path FILE, an existing file: {data_path!r}')
        if os.path.getsize(data_path) < 40:  # 5% of 40 bytes = 2, the least a stream needs
            raise DataError(f'{data_path} has {os.path.getsize(data_path)} bytes: text needs >= 40')
        return Corpus(*_split_90_5_5(np.memmap(data_path, np.uint8, mode='r')), vocab_size=256)
    meta, out = prepare(task, data_dir), os.path.join(data_dir, task)
    splits = [np.memmap(os.path.join(out, f'{s}.bin'), meta['dtype'], mode='r') for s in SPLITS]
    if task == 'enwik8':
        return Corpus(*splits, vocab_size=256)
    with open(os.path.join(out, 'vocab.txt'), encoding='utf-8') as f:
        itos = f.read().split('\n')[:-1]  # not splitlines(): that also splits on \x1c, \u2028
    cutoffs = [c for c in WT103_CUTOFFS if c < len(itos)] or None  # tiny corpora: plain softmax
    return Corpus(*splits, vocab_size=len(itos), cutoffs=cutoffs, itos=itos)


class Stream:
    """Transformer-XL's ordered iterator: world*B contiguous streams, rank r owns rows r*B..r*B+B-1,
    and row b of each call continues row b of the previous one (so carried memory is meaningful)."""

    def __init__(self, tokens, batch_size, window, rank=0, world=1):
        n = len(tokens) // (world * batch_size)  # tokens per stream
        if n < 2:
            raise DataError(f'{len(tokens)} tokens cannot make {world}x{batch_size} streams: '
                            'lower batch_size')
        if window + 1 > n:                       # window 0: read by eval_windows only
            raise DataError(f'streams of {n} tokens are shorter than one window of '
                            f'{window} + 1: lower batch_size or seg_len')
        rows = tokens[:world * batch_size * n].reshape(world * batch_size, n)  # views, no reads
        self.data = rows[rank * batch_size:(rank + 1) * batch_size]  # (B, n)
        self.B, self.window, self.pos = batch_size, window, 0

    def next(self):
        """The next (B, window) x and y; wraps to the start when the streams are used up."""
        n = self.data.shape[1]
        pos = self.pos if self.pos + self.window < n else 0  # wrap: start the streams again
        self.pos = pos + self.window
        return _shifted(self.data[:, pos:pos + self.window + 1])

    def state_dict(self):
        return {'pos': self.pos}

    def load_state_dict(self, d):
        self.pos = int(d['pos'])

    def eval_size(self, max_tokens=None):  # tokens eval_windows yields per stream row
        n = self.data.shape[1] - 1
        if max_tokens is not None:
            n = min(n, -(-max_tokens // self.B))
        return n

    def eval_windows(self, window, max_tokens=None):
        """Consecutive windows from the start (the last may be shorter) until the streams end or
        max_tokens, counted over this rank's B rows, have been yielded."""
        n, pos, done = self.data.shape[1], 0, 0
        while pos < n - 1 and (max_tokens is None or done < max_tokens):
            w = min(window, n - 1 - pos)
            if max_tokens is not None:
                w = min(w, -(-(max_tokens - done) // self.B))  # ceil: stop within B of the cap
            yield _shifted(self.data[:, pos:pos + w + 1])
            pos, done = pos + w, done + w * self.B


# ----------------------------------------------------------------------------- one rank's loaders
@dataclass
class Data:
    """A task's splits as one rank reads them."""
    loaders: dict              # 'train', 'val', 'test' -> Examples or Stream
    checksums: dict            # a digest per split: a resumed run checks that the data are the same
    vocab_size: int
    cutoffs: tuple = ()        # wt103: the adaptive softmax clusters
    spec: dict = None          # algorithmic tasks: vocab_size, ans_len, score_len
    corpus: Corpus = None      # LM tasks: the corpus, whose encode and decode generation uses


def load(task, seq_len, seed, data_dir, data_path, rows, window, rank=0, world=1):
    """Rank `rank`'s loaders of a task: `rows` examples (or streams) per step; LM training reads
    windows of `window` tokens, validation and test are read by eval_windows."""
    if task in ALGO_TASKS:
        spec = task_spec(task, seq_len)
        splits = make_splits(task, seq_len, seed)
        loaders = {s: Examples(a, spec['ans_len'], rows, rank, world, seed)
                   for s, a in splits.items()}
        checksums = {s: split_checksum(a) for s, a in splits.items()}
        return Data(loaders, checksums, spec['vocab_size'], spec=spec)
    corpus = load_corpus(task, data_dir, data_path)
    loaders = {s: Stream(getattr(corpus, s), rows, 0, rank, world) for s in ('val', 'test')}
    loaders['train'] = Stream(corpus.train, rows, window, rank, world)
    checksums = {s: split_checksum(getattr(corpus, s)) for s in SPLITS}
    return Data(loaders, checksums, corpus.vocab_size, tuple(corpus.cutoffs or ()),
                corpus=corpus)


if __name__ == '__main__':
    import argparse
    p = argparse.ArgumentParser(description='prepare a language-modelling corpus')
    p.add_argument('task', choices=LM_TASKS)
    p.add_argument('data_path', nargs='?', help='the file for the text task')
    p.add_argument('--data_dir', default='data')
    a = p.parse_args()
    try:
        c = load_corpus(a.task, a.data_dir, a.data_path)
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    print(f'{a.task}: vocab {c.vocab_size}, tokens train {len(c.train):,} val {len(c.val):,} '
          f'test {len(c.test):,}')
