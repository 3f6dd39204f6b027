"""The one entry point: train, evaluate, sample or time (--mode) every architecture on every task,
on a CPU, one GPU or many GPUs; flags override the task's preset. No flags: RMT learns to copy.
  torchrun --standalone --nproc_per_node=8 train.py --task enwik8
  python train.py --mode bench --task enwik8 --preset enwik8 --batch_size 8   # speed, one line
"""
import ctypes
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

import data
import memory
from model import MemTransformer, ModelConfig


# ----------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    task: str = 'copy'         # copy | reverse | retrieval | sqeq | enwik8 | wt103 | text
    preset: str = ''           # a PRESETS key; '' = '<task>_cpu' on a CPU, '<task>' on a GPU
    mode: str = 'train'        # train | eval | sample | bench (timed steps, one result line)
    seq_len: int = 24          # copy, reverse: source length S (paper: 24, 40, 120, 240, 360)
    data_dir: str = 'data'     # where enwik8 / wt103 / text splits are prepared
    data_path: str = ''        # text: any local file, read as bytes
    batch_size: int = 64       # examples (or LM streams) per micro-step per process
    grad_accum: int = 1        # micro-steps per optimizer step
    lr: float = 1e-3           # Adam learning rate
    schedule: str = 'plateau'  # plateau: constant, halved when val loss stalls | cosine: warm-up
    warmup_iters: int = 0      # cosine: linear warm-up steps
    patience: int = 4          # plateau: evaluations without improvement before halving the lr
    grad_clip: float = 0.25    # max gradient norm (0 = off)
    max_iters: int = 4000      # optimizer steps
    eval_interval: int = 500   # steps between validations (and checkpoints)
    eval_examples: int = 1000  # algorithmic tasks: examples per evaluation (0 = whole split)
    eval_tokens: int = 0       # LM tasks: tokens per rank per evaluation (0 = whole split)
    log_interval: int = 250    # steps between log lines
    seed: int = 1337
    device: str = 'auto'       # auto | cpu | cuda | cuda:N
    dtype: str = 'auto'        # float32 | bfloat16 | float16 autocast; auto: bf16 where it is fast
    compile: bool = False      # torch.compile each segment (GPU; minutes to compile on a CPU)
    bench_iters: int = 10      # bench: timed training and evaluation steps, after 3 warm-up steps
    out_dir: str = 'out'       # checkpoints: ckpt.pt (latest), best.pt (best validation)
    init_from: str = ''        # checkpoint to evaluate, sample or fine-tune ('' = scratch)
    resume: bool = False       # continue the run in out_dir from its ckpt.pt, exactly
    skip_nonfinite: int = 0    # steps with a non-finite gradient to skip before stopping
    sample_len: int = 500      # sample: tokens to generate
    temperature: float = 0.9   # sample: 0 = greedy
    top_k: int = 40            # sample: keep the k most likely tokens (0 = all)
    prompt: str = '\n'         # sample: text to continue


# the papers' settings (SPEC §6, GPU-days), small ones that learn on 2 CPU cores in minutes ('_cpu')
PAPER = dict(n_layer=4, d_model=128, n_head=4, d_head=64, d_inner=256, dropout=0.1, lr=1e-4,
             batch_size=32, max_iters=250_000, eval_interval=5000, eval_examples=0)
NARROW = dict(d_model=64, d_head=32, d_inner=128)                     # retrieval
LM = dict(dropout=0.1, schedule='cosine', bptt_depth=1, eval_tokens=0, lr=2.5e-4,
          eval_interval=4000, log_interval=200)    # language modelling: the RMT paper's models
ENWIK8 = dict(LM, n_layer=12, d_model=512, n_head=8, d_head=64, d_inner=2048, batch_size=22,
              max_iters=400_000, seg_len=128, mem_len=128, n_mem_tokens=10)
LM_CPU = dict(LM, n_layer=4, d_model=128, n_head=4, d_head=32, d_inner=512, lr=1e-3,
              warmup_iters=100, batch_size=12, max_iters=2000, eval_interval=500,
              eval_tokens=20_000, seg_len=64, mem_len=40, n_mem_tokens=10, log_interval=250)
PRESETS = {                              # a preset's task is its name without '_cpu'
    'copy': dict(PAPER, seq_len=24, seg_len=12, n_mem_tokens=6, mem_len=6),
    'reverse': dict(PAPER, seq_len=24, seg_len=12, n_mem_tokens=6, mem_len=6),
    'retrieval': dict(PAPER, **NARROW, n_layer=6, seg_len=5, n_mem_tokens=5, mem_len=5),
    'sqeq': dict(PAPER, n_layer=6, n_head=6, max_iters=600_000, seg_len=30, n_mem_tokens=30,
                 mem_len=30),
    'copy_cpu': dict(),                  # the defaults
    'reverse_cpu': dict(max_iters=8000),  # 48 input tokens: 2 segments
    'retrieval_cpu': dict(n_layer=3, seg_len=3, n_mem_tokens=3, mem_len=3, batch_size=256),
    'sqeq_cpu': dict(seg_len=30, n_mem_tokens=30, mem_len=30, batch_size=32, eval_examples=500),
    'enwik8': ENWIK8, 'text': ENWIK8,
    'wt103': dict(LM, n_layer=16, d_model=410, n_head=10, d_head=41, d_inner=2100, batch_size=60,
                  max_iters=200_000, seg_len=150, mem_len=150, n_mem_tokens=25, bptt_depth=2),
    'enwik8_cpu': LM_CPU, 'text_cpu': dict(LM_CPU, eval_tokens=0),
    'wt103_cpu': dict(LM_CPU, seg_len=32, mem_len=32),
}


def die(msg, code=2):  # bad input ends in one line that names the fix, exit 2, no traceback
    print(f'error: {msg}', file=sys.stderr)
    sys.exit(code)


def parse_flags(argv):  # every dataclass field is a flag: --name value or --name=value
    types = {f.name: f.type for c in (ModelConfig, TrainConfig) for f in fields(c)}
    args, given = list(argv), {}
    while args:
        arg = args.pop(0)
        name, eq, val = arg.removeprefix('--').partition('=')
        typ = types.get(name) if arg.startswith('--') else None
        if typ is None:
            die(f"unknown flag '{arg}': flags are --name value with a name from "
                "ModelConfig or TrainConfig (python train.py --help lists them)")
        if not eq and typ is bool and (not args or args[0][:2] == '--'):
            val = 'true'                         # a bare boolean means true
        elif not eq:
            val = args.pop(0) if args else die(f'flag --{name} needs a value')
        try:
            if typ is bool:
                val = {'true': True, '1': True, 'false': False, '0': False}[val.lower()]
            given[name] = tuple(int(v) for v in val.split(',') if v) if typ is tuple else typ(val)
        except (KeyError, ValueError):
            die(f"--{name} expects a {typ.__name__}, got '{val}'")
    return given


def choose_preset(given):  # -> (preset name, why it was chosen: the log's first line says)
    if given.get('preset'):
        return given['preset'], 'given by --preset'
    if 'task' not in given:      # the quickstart: quick on every device, a GPU included
        return 'copy_cpu', 'no --task or --preset: the quick copy run'
    task = given['task']
    cuda = torch.cuda.is_available() and given.get('device', 'auto') != 'cpu'
    if cuda and task in PRESETS:
        return task, f'--task {task} on a GPU: the paper setting; --preset {task}_cpu is small'
    return f'{task}_cpu', f'--task {task} on a CPU: the small setting; --preset {task} is the paper'


def make_configs(given, ckpt=None, path=''):  # defaults <- preset <- flags, or ckpt's <- flags
    if ckpt is not None:
        mc, tc, preset = dict(ckpt['model_cfg']), dict(ckpt['train_cfg']), {}
        if given.get('arch', mc['arch']) != mc['arch']:
            die(f"the checkpoint holds an '{mc['arch']}' model, not '{given['arch']}': "
                'drop --arch or use another checkpoint')
        why = f'from {path}'
    else:
        name, why = choose_preset(given)
        if name not in PRESETS:
            die(f"unknown preset '{name}': use one of {', '.join(PRESETS)}")
        mc, tc, preset = {}, dict(preset=name, task=name.removesuffix('_cpu')), PRESETS[name]
    for k, v in {**preset, **given}.items():
        (tc if k in TrainConfig.__dataclass_fields__ else mc)[k] = v
    try:
        tcfg = TrainConfig(**tc)
        for k, ok in (('task', data.ALGO_TASKS + data.LM_TASKS),
                      ('mode', ('train', 'eval', 'sample', 'bench')),
                      ('schedule', ('plateau', 'cosine')),
                      ('dtype', ('auto', 'float32', 'bfloat16', 'float16'))):
            if getattr(tcfg, k) not in ok:
                raise ValueError(f"unknown {k} '{getattr(tcfg, k)}': use one of {', '.join(ok)}")
        if tcfg.mode == 'sample' and tcfg.task not in data.LM_TASKS:
            raise ValueError('--mode sample needs a language-modelling task (enwik8, wt103, text)')
        for k in ('seq_len', 'batch_size', 'grad_accum', 'max_iters', 'eval_interval',
                  'log_interval', 'bench_iters'):
            if getattr(tcfg, k) < 1:
                raise ValueError(f'--{k} must be >= 1')
        mcfg = ModelConfig(**mc)
        if tcfg.task in data.LM_TASKS and mcfg.bptt_depth < 0:
            raise ValueError('LM streams need --bptt_depth >= 0 (segments per step - 1)')
    except (TypeError, ValueError) as e:
        die(str(e))
    return mcfg, tcfg, why


def load_checkpoint(path, resume=False):
    if not os.path.isfile(path):
        die(f'no checkpoint to resume at {path}: start without --resume or fix --out_dir'
            if resume else f'no checkpoint at {path}: train first, or pass --init_from PATH')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        die(f'{path} is not a readable checkpoint ({type(e).__name__}): use another file')
    if not isinstance(ckpt, dict) or not {'model', 'model_cfg', 'train_cfg'} <= ckpt.keys():
        die(f'{path} is not a checkpoint of this codebase: use another file')
    if resume and 'ranks' not in ckpt:
        die(f'{path} holds no training state to resume (older format): start a new run')
    return ckpt


def main(argv):
    if '--help' in argv or '-h' in argv:
        for c in (ModelConfig, TrainConfig):
            print(' '.join(f'--{f.name} {f.default!r}' for f in fields(c)))
        return
    given = parse_flags(argv)
    resume = given.get('resume', False)
    path = os.path.join(given.get('out_dir', TrainConfig.out_dir), 'ckpt.pt') if resume \
        else given.get('init_from', '')
    ckpt = load_checkpoint(path, resume) if path else None
    mcfg, tcfg, why = make_configs(given, ckpt, path)
    # ------------------------------------------------------------------------- DDP / device
    ddp, use_cuda = 'RANK' in os.environ, torch.cuda.is_available() and tcfg.device != 'cpu'
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    device = tcfg.device if tcfg.device != 'auto' else 'cuda' if use_cuda else 'cpu'
    if ddp:                                      # torchrun: one process per GPU (or CPU share)
        dist.init_process_group('nccl' if use_cuda else 'gloo')
        device = f"cuda:{os.environ['LOCAL_RANK']}" if use_cuda else 'cpu'
    master, cuda = rank == 0, device.startswith('cuda')
    if ddp and cuda:
        torch.cuda.set_device(device)
    print0 = print if master else (lambda *args, **kwargs: None)   # rank 0 speaks for all
    if tcfg.mode == 'train':
        print0(f'preset {tcfg.preset} ({why})')
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # fp32 on GPU
    flags = '' if cuda or not os.path.exists('/proc/cpuinfo') else open('/proc/cpuinfo').read()
    fast = torch.cuda.is_bf16_supported() if cuda else 'amx_bf16' in flags or 'avx512_bf16' in flags
    auto = 'bfloat16' if fast else 'float32'     # bf16 on CUDA, or on a CPU with AMX or AVX512-BF16
    dtype = getattr(torch, auto if tcfg.dtype == 'auto' else tcfg.dtype)   # autocast; weights fp32
    ctx = torch.autocast(device.split(':')[0], dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.split(':')[0], enabled=dtype == torch.float16)
    torch.manual_seed(tcfg.seed + rank)          # dropout differs per rank; init is broadcast
    # ------------------------------------------------------------------------- data
    algo = tcfg.task in data.ALGO_TASKS
    # one step = grad_accum micro-steps of batch_size rows: this rank holds batch_size * grad_accum
    # examples (or LM streams) per step and splits them in time-ordered chunks (Tr-XL batch_chunk)
    rows = tcfg.batch_size * tcfg.grad_accum
    try:
        if algo:
            spec = data.task_spec(tcfg.task, tcfg.seq_len)
            splits = data.make_splits(tcfg.task, tcfg.seq_len, tcfg.seed)
            mcfg.vocab_size = spec['vocab_size']
            loaders = {s: data.Examples(a, spec['ans_len'], rows, rank, world, tcfg.seed)
                       for s, a in splits.items()}
            checksums = {s: data.split_checksum(a) for s, a in splits.items()}
            print0('data:', ', '.join(f'{s} {len(splits[s])} ({c})' for s, c in checksums.items()))
        else:
            if ddp and not master:
                dist.barrier()                   # rank 0 prepares the files, the others wait
            corpus = data.load_corpus(tcfg.task, tcfg.data_dir, tcfg.data_path or None)
            if ddp and master:
                dist.barrier()
            mcfg.vocab_size, mcfg.cutoffs = corpus.vocab_size, tuple(corpus.cutoffs or ())
            checksums = {s: len(getattr(corpus, s)) for s in data.SPLITS}
            window = mcfg.seg_len * (mcfg.bptt_depth + 1)   # BPTT-k: k+1 segments per step
            loaders = {s: data.Stream(getattr(corpus, s), rows, window, rank, world)
                       for s in data.SPLITS}
    except data.DataError as e:
        die(str(e))
    # ------------------------------------------------------------------------- model / optimizer
    model = raw = MemTransformer(mcfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=tcfg.lr, fused=cuda)
    scheduler = ReduceLROnPlateau(optimizer, factor=0.5, patience=tcfg.patience) \
        if tcfg.schedule == 'plateau' else LambdaLR(optimizer, lambda i: (  # cosine: warm-up,
            (i + 1) / tcfg.warmup_iters if i < tcfg.warmup_iters   # then decay to 0 at max_iters
            else 0.5 * (1 + math.cos(math.pi * min(1.0, i / tcfg.max_iters)))))
    start, best_val, states = 0, float('inf'), [None] * tcfg.grad_accum   # states: LM memory
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt['model'])
        except RuntimeError:
            die(f'{path} does not fit this model (other size or vocabulary): '
                'give the matching flags or another checkpoint')
    if resume:
        if len(ckpt['ranks']) != world:
            die(f"{path} was written by {len(ckpt['ranks'])} processes: resume with as many")
        if ckpt['data'] != checksums:
            die(f'the data differ from those {path} was trained on: restore them')
        optimizer.load_state_dict(ckpt['optimizer'])
        scheduler.load_state_dict(ckpt['scheduler'])
        if 'lr' in given:                        # a new --lr wins over the checkpoint's
            optimizer.param_groups[0]['lr'], scheduler.base_lrs = tcfg.lr, [tcfg.lr]
        start, best_val, mine = ckpt['step'], ckpt['best_val'], ckpt['ranks'][rank]
        if len(mine['memory']) != tcfg.grad_accum:
            die(f"{path} was trained with --grad_accum {len(mine['memory'])}: resume with it")
        torch.set_rng_state(mine['rng'])
        if mine['cuda_rng'] is not None and cuda:
            torch.cuda.set_rng_state(mine['cuda_rng'])
        states = [memory.to_device(s, device) for s in mine['memory']]
        if not algo:
            loaders['train'].load_state_dict(ckpt['loader'])
    if tcfg.compile:     # each segment is one graph; shapes settle after the first segments
        raw.segment = torch.compile(raw.segment)
    if ddp:  # no buffers to broadcast: memory is passed in and out of forward; LM: the initial
        model = DDP(model, device_ids=[device] if device != 'cpu' else None,   # RMT memory goes
                    find_unused_parameters=mcfg.n_mem_tokens > 0 and not algo)  # unused (carried)
    # ------------------------------------------------------------------------- helpers
    def reduce(vals):                            # sum over ranks: sums, never means of means
        t = torch.tensor(vals, dtype=torch.float64, device=device)
        if ddp:
            dist.all_reduce(t)
        return t.tolist()
    def evaluate(split):  # -> loss, a line of metrics (algorithmic: accuracy; LM: bpc or ppl)
        raw.eval()
        with torch.no_grad(), ctx:       # one autocast region per evaluation: weights cast once
            if algo:                     # token accuracy teacher-forced and free-running
                sums, size = [0.0] * 6, 4 * tcfg.batch_size
                for x, y, w in loaders[split].eval_batches(size, tcfg.eval_examples or None):
                    batch = data.answer_metrics(raw, x.to(device), y.to(device), w.to(device),
                                                spec['ans_len'], spec['score_len'])
                    sums = [a + b for a, b in zip(sums, batch)]
                nll, n, n_ans, tf, fr, em = reduce(sums)
                n_ex = n_ans / spec['score_len']
                res = dict(loss=nll / n, acc_tf=tf / n_ans, acc_free=fr / n_ans, exact=em / n_ex,
                           n=int(n_ex))
            else:                        # token-weighted NLL over this rank's streams
                state, nll, n = None, 0.0, 0
                for x, y in loaders[split].eval_windows(mcfg.seg_len, tcfg.eval_tokens or None):
                    out, state = raw(x.to(device), state, y.to(device))
                    nll, n = nll + out.sum().item(), n + out.numel()
                nll, n = reduce([nll, n])
                res = dict(loss=nll / n, n=int(n))
                res['bpc' if tcfg.task != 'wt103' else 'ppl'] = \
                    nll / n / math.log(2) if tcfg.task != 'wt103' else math.exp(nll / n)
        raw.train()
        return res['loss'], ' | '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}'
                                       for k, v in res.items())
    def get_batch(i):     # step i's rows (or the streams' next window) on the device, tokens
        x, y, w = loaders['train'].batch(i) if algo else (*loaders['train'].next(), None)
        n = y.numel() if w is None else int(w.sum())     # counted on the CPU: no device sync
        x, y, w = (t if t is None else (t.pin_memory() if cuda else t).to(device, non_blocking=True)
                   for t in (x, y, w))                   # pinned: the copy overlaps compute
        return x, y, w, n
    def train_step(it):   # grad_accum micro-steps, clip, step unless the gradient is not finite
        x, y, w, n_tok = get_batch(it)
        G, mean_loss = tcfg.grad_accum, 0.0
        # micro-step m trains on rows m*B..(m+1)*B with the memory those rows left at the last step
        for micro, (xm, ym, wm) in enumerate(zip(x.chunk(G), y.chunk(G),
                                                 [None] * G if w is None else w.chunk(G))):
            with model.no_sync() if ddp and micro < G - 1 else nullcontext():
                with ctx:
                    nll, states[micro] = model(xm, None if algo else states[micro], ym)
                    loss = nll.float().mean() if wm is None else (nll.float() * wm).sum() / wm.sum()
                # equal chunks: the mean of the chunks' means is the mean over the whole batch
                scaler.scale(loss / G).backward()
            mean_loss = mean_loss + loss.detach() / G
        scaler.unscale_(optimizer)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip or math.inf)
        ok = scaler.is_enabled() or torch.isfinite(gnorm)   # fp16: the scaler skips overflows
        if ok:
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return mean_loss, gnorm, n_tok, x.numel(), ok
    def mfu(tok_per_s, train):  # model FLOP/s of this process, and the fraction of the GPU's peak
        flops = raw.flops_per_token(train) * tok_per_s / 1e12          # TFLOP/s
        gpu = torch.cuda.get_device_name(device) if cuda else ''
        peak = next((v for k, v in {'H100': 989, 'H200': 989, 'A100': 312}.items() if k in gpu), 0)
        peak /= 2 if dtype == torch.float32 else 1      # dense bf16 TFLOP/s per GPU; TF32 is half
        return f'{flops:.1f} TFLOP/s | mfu {flops / peak:.1%}' if peak else f'{flops:.3f} TFLOP/s'
    def checkpoint(name, step):  # all it takes to continue exactly; every rank gathers, 0 writes
        mine = dict(rng=torch.get_rng_state(), memory=[
            None if s is None else tuple(memory.to_device(s, 'cpu')) for s in states],
            cuda_rng=torch.cuda.get_rng_state() if cuda else None)
        ranks = [mine] * world
        if ddp:
            dist.all_gather_object(ranks, mine)
        if not master:
            return
        dest = os.path.join(tcfg.out_dir, name)
        tmp = f'{dest}.tmp{os.getpid()}'     # temp file, fsync, rename: never a torn checkpoint
        try:
            os.makedirs(tcfg.out_dir, exist_ok=True)
            with open(tmp, 'wb') as f:
                torch.save(dict(model=raw.state_dict(), optimizer=optimizer.state_dict(),
                                scheduler=scheduler.state_dict(), model_cfg=asdict(mcfg),
                                train_cfg=asdict(tcfg), step=step, best_val=best_val, ranks=ranks,
                                data=checksums,
                                loader=None if algo else loaders['train'].state_dict()), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except (OSError, RuntimeError) as e:     # torch.save reports a full disk as RuntimeError
            if os.path.exists(tmp):
                os.remove(tmp)
            die(f'could not write {dest} ({type(e).__name__}: {str(e).splitlines()[0][:80]}): '
                'free disk space or change --out_dir; the previous checkpoint is intact')
    # ------------------------------------------------------------------------- eval, sample, bench
    if tcfg.mode == 'eval':
        print0(f'eval: arch {mcfg.arch} | seg_len {mcfg.seg_len} | mem_len {mcfg.mem_len} | '
               f'n_mem_tokens {mcfg.n_mem_tokens} | clamp_len {mcfg.clamp_len}')
        for split in ('val', 'test'):
            print0(f'{split}: {evaluate(split)[1]}')     # evaluate runs on every rank
    elif tcfg.mode == 'sample':
        raw.eval()
        prompt = torch.as_tensor(corpus.encode(tcfg.prompt), dtype=torch.long, device=device)
        out = raw.generate(prompt[None], tcfg.sample_len, None, tcfg.temperature, tcfg.top_k)
        print(corpus.decode(prompt.tolist() + out[0].tolist()))   # the prompt as the model saw it
    elif tcfg.mode == 'bench':  # warm-up, timed training steps, timed evaluation steps, one line
        def memory_bytes(peak=False):    # in use now (and a new peak), or the peak since
            if cuda:
                if not peak:
                    torch.cuda.reset_peak_memory_stats()
                return torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()
            try:
                if not peak:
                    ctypes.CDLL('libc.so.6').malloc_trim(0)          # freed heap back to the OS
                    open('/proc/self/clear_refs', 'w').write('5')   # reset the high-water mark
                status = open('/proc/self/status').read()
                return int(status.split('VmHWM:' if peak else 'VmRSS:')[1].split()[0]) * 1024
            except (OSError, IndexError):
                return 0
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        for it in range(3):
            train_step(it)
        sync()
        base, t0 = memory_bytes(), time.time()
        tok, seen = map(sum, zip(*[train_step(i)[2:4] for i in range(3, 3 + tcfg.bench_iters)]))
        sync()
        dt_train, peak = time.time() - t0, memory_bytes(peak=True) - base
        raw.eval()
        with torch.no_grad(), ctx:
            n_eval, seen_eval, state = 0, 0, None
            for it in range(tcfg.bench_iters + 1):
                if it == 1:                      # the first step is warm-up (casts, kernels)
                    sync()
                    t0, n_eval, seen_eval = time.time(), 0, 0
                x, y, w, n = get_batch(it)
                _, state = raw(x, None if algo else state, y)
                n_eval, seen_eval = n_eval + n, seen_eval + x.numel()
            sync()
            dt_eval = time.time() - t0
        print0(f'model: {mfu(seen / dt_train, True)} training, {mfu(seen_eval / dt_eval, False)}'
               f' evaluation (dtype {str(dtype)[6:]}, {"compiled" if tcfg.compile else "eager"})')
        print0(f'bench: train {tok * world / dt_train:.0f} tok/s, eval '
               f'{n_eval * world / dt_eval:.0f} tok/s, peak {peak / 2**20:.0f} MB, '
               f'step {1000 * dt_train / tcfg.bench_iters:.0f} ms')
    if tcfg.mode != 'train':
        return
    # ------------------------------------------------------------------------- training loop
    print0(f'task {tcfg.task} | arch {mcfg.arch} | '
           f'{sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M params | world {world} | '
           f'device {device}')
    signals = []                                 # SIGINT/SIGTERM: checkpoint, then exit
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: signals.append(signum))
    t0, n_tok, n_seen, skipped = time.time(), 0, 0, 0
    for it in range(start, tcfg.max_iters):
        loss, gnorm, n, seen, ok = train_step(it)
        n_tok, n_seen, step = n_tok + n, n_seen + seen, it + 1
        if not ok:                               # the same on every rank: grads are reduced
            states, skipped = [None] * tcfg.grad_accum, skipped + 1
            if skipped > tcfg.skip_nonfinite:
                last = os.path.join(tcfg.out_dir, 'ckpt.pt')
                if os.path.exists(last):
                    fix = (f'the last good checkpoint is {last}: resume it with --resume, '
                           'perhaps with a lower --lr, or allow --skip_nonfinite N')
                else:
                    fix = ('no checkpoint was written yet: start over with a lower --lr, '
                           'or allow --skip_nonfinite N')
                die(f'non-finite loss or gradient at step {step}; {fix}', code=1)
            continue
        if tcfg.schedule == 'cosine':
            scheduler.step()
        if step % tcfg.log_interval == 0 and master:
            dt = time.time() - t0
            print(f'step {step} | loss {loss.item():.4f} | lr {optimizer.param_groups[0]["lr"]:.2e}'
                  f' | gnorm {gnorm.item():.2f} | {1000 * dt / tcfg.log_interval:.0f} ms/step | '
                  f'{n_tok * world / dt:.0f} tok/s | {mfu(n_seen / dt, True)}', flush=True)
            t0, n_tok, n_seen = time.time(), 0, 0
        if step % tcfg.eval_interval == 0 or step == tcfg.max_iters:
            val_loss, metrics = evaluate('val')
            if tcfg.schedule == 'plateau':
                scheduler.step(val_loss)
            print0(f'val step {step}: {metrics}', flush=True)
            if val_loss < best_val:
                best_val = val_loss
                checkpoint('best.pt', step)
            checkpoint('ckpt.pt', step)
            t0 = time.time()
        if (reduce([len(signals)])[0] > 0) if ddp else signals:   # all ranks stop at one step
            checkpoint('ckpt.pt', step)
            print0(f'stopped by a signal at step {step}: continue with --resume', flush=True)
            sys.exit(128 + (signals[0] if signals else signal.SIGTERM))
    # ------------------------------------------------------------------------- final test
    print0(f"test: {evaluate('test')[1]}")
    if ddp:  # DDP's reducer goes before the process group: else gloo may abort at exit
        del model
        dist.barrier()
        dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1:])
