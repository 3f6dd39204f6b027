"""The one entry point: train or evaluate (--mode) every architecture on every task, on a CPU,
one GPU or many GPUs; flags override the task's preset. No flags: RMT learns to copy.
  torchrun --standalone --nproc_per_node=8 train.py --task enwik8
Speed: each log line gives ms/step, tokens/s and model FLOP/s (MFU on A100/H100/H200) over the
steps since the last line; each validation line its wall time.
"""
import fcntl
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
    preset: str = ''           # a PRESETS key; '': copy_cpu, or with --task X: X on a GPU, X_cpu
    mode: str = 'train'        # train | eval (a checkpoint on val and test)
    seq_len: int = 24          # copy, reverse: source length S (paper: 24, 40, 120, 240, 360)
    data_dir: str = 'data'     # where enwik8 / wt103 / text splits are prepared
    data_path: str = ''        # text: any local file, read as bytes
    batch_size: int = 64       # examples (or LM streams) per micro-step per process
    grad_accum: int = 1        # micro-steps per optimizer step
    lr: float = 1e-3           # Adam learning rate
    schedule: str = 'plateau'  # plateau: constant, halved when val loss stalls | cosine: warm-up
    warmup_iters: int = 0      # cosine: linear warm-up steps
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
    out_dir: str = 'out'       # checkpoints: ckpt.pt (latest), best.pt (best validation)
    init_from: str = ''        # checkpoint to evaluate or fine-tune ('' = scratch)
    resume: str = 'auto'       # auto: continue out_dir's run of this configuration, if any |
    #                            true (a bare --resume): continue it, flags may change the loop's
    #                            knobs | false: start anew, replacing out_dir's run
    skip_nonfinite: int = 0    # steps with a non-finite gradient to skip before stopping


# the settings of the RMT and Transformer-XL papers (GPU-days), and small ones that learn on 2
# CPU cores in minutes ('_cpu')
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
    'reverse_cpu': dict(n_layer=4, n_head=4, max_iters=8000),  # 48 input tokens: 2 segments
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
    leave(code)


def leave(code):
    """End the process with `code`. Under torchrun, skip the interpreter's shutdown: gloo's worker
    threads may still be freeing finished collectives, and freeing one that holds a Python object
    takes the GIL, which aborts the process once shutdown has begun (SIGABRT, in a few percent of
    two-node runs here; pytorch/pytorch#179291). Nor is the process group destroyed: the exit frees
    it. Checkpoints are synced to disk as they are written: skipping the shutdown loses nothing."""
    if dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
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
        bare = not eq and (not args or args[0][:2] == '--')
        if bare and (typ is bool or name == 'resume'):
            val = 'true'                         # a bare boolean (or --resume) means true
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


# the lowest allowed value of a number (nan fails the comparison, so it is refused too)
AT_LEAST = dict(seq_len=1, batch_size=1, grad_accum=1, max_iters=1, eval_interval=1,
                log_interval=1, eval_examples=0, eval_tokens=0, warmup_iters=0, skip_nonfinite=0,
                grad_clip=0, seed=0)
# what the data decide, never a flag: the vocabulary and its adaptive-softmax clusters
FROM_DATA = ('vocab_size', 'cutoffs')


def devices():  # the --device values this machine has
    n_gpu = torch.cuda.device_count()
    return ['auto', 'cpu'] + ['cuda'] * (n_gpu > 0) + [f'cuda:{i}' for i in range(n_gpu)]


def make_configs(given, ckpt=None, path='', resuming=False):
    """-> (ModelConfig, TrainConfig, why): defaults <- preset <- flags, or a checkpoint's <- flags
    (choose_start has checked what a resumed run may change). A run that starts from
    --init_from weights writes to its own --out_dir, never into the checkpoint's."""
    tasks = data.ALGO_TASKS + data.LM_TASKS
    if given.get('task', 'copy') not in tasks:
        die(f"unknown task '{given['task']}': use one of {', '.join(tasks)}")
    for k in FROM_DATA:
        if k in given:
            die(f'--{k} is set by the task\'s data: drop the flag')
    if ckpt is not None:
        mc, tc, preset = dict(ckpt['model_cfg']), dict(ckpt['train_cfg']), {}
        tc.pop('resume', None)
        if not resuming:
            tc['out_dir'] = TrainConfig.out_dir
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
        for k, ok in (('mode', ('train', 'eval')),
                      ('schedule', ('plateau', 'cosine')),
                      ('dtype', ('auto', 'float32', 'bfloat16', 'float16')),
                      ('device', devices())):
            if getattr(tcfg, k) not in ok:
                raise ValueError(f"unknown {k} '{getattr(tcfg, k)}': use one of {', '.join(ok)}")
        for k, low in AT_LEAST.items():
            if not getattr(tcfg, k) >= low:
                raise ValueError(f'--{k} must be >= {low}, got {getattr(tcfg, k)}')
        if not 0 < tcfg.lr < math.inf:
            raise ValueError(f'--lr must be > 0 and finite, got {tcfg.lr}')
        if tcfg.seed + 64 >= 2 ** 63:            # numpy and torch seeds are 63-bit (+ the rank)
            raise ValueError(f'--seed must be below 2**63 - 64, got {tcfg.seed}')
        mcfg = ModelConfig(**mc)
        if tcfg.task in data.LM_TASKS and mcfg.bptt_depth < 0:
            raise ValueError('LM streams need --bptt_depth >= 0 (segments per step - 1)')
    except (TypeError, ValueError) as e:
        die(str(e))
    return mcfg, tcfg, why


# ----------------------------------------------------------------------------- DDP / device
@dataclass
class Env:
    """Where and how this process runs."""
    device: str                # 'cpu', 'cuda' or 'cuda:N'
    rank: int                  # this process among world (torchrun's RANK; 0 alone)
    world: int
    ddp: bool                  # started by torchrun: gradients and metrics are reduced
    dtype: torch.dtype         # autocast dtype; weights and Adam stay float32
    autocast: object           # the autocast context of every forward pass
    scaler: torch.amp.GradScaler   # float16 only: scales the loss against underflow
    master: bool               # rank 0: prints and writes checkpoints
    cuda: bool

    def print(self, *args, **kwargs):  # rank 0 speaks for all
        if self.master:
            print(*args, **kwargs)


def setup(tcfg):
    ddp = 'RANK' in os.environ
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    gpu = torch.cuda.is_available() and tcfg.device != 'cpu'
    device = tcfg.device
    if device == 'auto':
        device = 'cuda' if gpu else 'cpu'
    if ddp and gpu:                              # torchrun: one process per GPU ...
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
        dist.init_process_group('nccl')
    elif ddp:                                    # ... or per share of the CPU
        device = 'cpu'
        dist.init_process_group('gloo')
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # fp32 on GPU
    # --dtype auto: bf16 on CUDA with bf16, or on a CPU with AMX or AVX512-BF16, else float32
    name, fast = tcfg.dtype, False
    if name == 'auto' and device.startswith('cuda'):
        fast = torch.cuda.is_bf16_supported()
    elif name == 'auto' and os.path.exists('/proc/cpuinfo'):
        fast = any(f in open('/proc/cpuinfo').read() for f in ('amx_bf16', 'avx512_bf16'))
    if name == 'auto':
        name = 'bfloat16' if fast else 'float32'
    dtype, kind = getattr(torch, name), device.split(':')[0]
    torch.manual_seed(tcfg.seed + rank)          # dropout differs per rank; init is broadcast
    return Env(device, rank, world, ddp, dtype,
               autocast=torch.autocast(kind, dtype, enabled=dtype != torch.float32),
               scaler=torch.amp.GradScaler(kind, enabled=dtype == torch.float16),
               master=rank == 0, cuda=device.startswith('cuda'))


def reduce(vals, env):  # sum over ranks: sums, never means of means
    t = torch.tensor(vals, dtype=torch.float64, device=env.device)
    if env.ddp:
        dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------- data
def load_data(tcfg, mcfg, env):
    """The task's splits for this rank (data.load); sets the model's vocabulary from them. One
    step holds batch_size * grad_accum examples (or LM streams) per rank, split into grad_accum
    chunks in train_step (Transformer-XL's batch_chunk); an LM step trains on bptt_depth + 1
    segments of each stream."""
    if env.ddp and not env.master:
        dist.barrier()                           # rank 0 prepares the LM files, the others wait
    try:
        dat = data.load(tcfg.task, tcfg.seq_len, tcfg.seed, tcfg.data_dir, tcfg.data_path or None,
                        rows=tcfg.batch_size * tcfg.grad_accum,
                        window=mcfg.seg_len * (mcfg.bptt_depth + 1), rank=env.rank,
                        world=env.world)
    except data.DataError as e:
        die(str(e))
    if env.ddp and env.master:
        dist.barrier()
    mcfg.vocab_size, mcfg.cutoffs = dat.vocab_size, dat.cutoffs
    if dat.spec is not None:
        env.print('data:', ', '.join(f'{s} {len(dat.loaders[s].seqs)} ({c})'
                                     for s, c in dat.checksums.items()))
    return dat


def check_fits(mcfg, tcfg, dat, env):
    """Refuse a step that plainly cannot fit, before anything is allocated. A lower bound: per
    layer and segment, the attention probabilities (B, H, S, K) and the FFN's hidden layer
    (B, S, d_inner) at 4 bytes each (autograd keeps about 9 bytes per probability in bf16, 18
    in fp32); training keeps them for every segment of a step (an LM window, or a whole example),
    evaluation for one layer of one segment at a time."""
    S = mcfg.seg_len + 2 * mcfg.n_mem_tokens         # RMT: read and write slots
    held = mcfg.n_layer * (mcfg.bptt_depth + 1)      # an LM step: k+1 segments
    if dat.spec is not None:
        held = mcfg.n_layer * dat.loaders['train'].seqs.shape[1] / mcfg.seg_len
    if mcfg.grad_checkpoint:                         # one segment at a time
        held = mcfg.n_layer
    if tcfg.mode == 'eval':
        held = 1
    need = 4 * held * tcfg.batch_size * S * (mcfg.n_head * (mcfg.mem_len + S) + mcfg.d_inner)
    have = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    if env.cuda:
        have = torch.cuda.get_device_properties(env.device).total_memory
    if need > have:
        die(f'one step would need over {need / 2**30:.0f} GiB of activations, and this '
            f'{env.device} has {have / 2**30:.0f} GiB: lower --batch_size, --seg_len or --mem_len')


def get_batch(dat, step, env):
    """Step's rows x, y and answer weights w (LM: the streams' next window, w None) on the
    device, and the trained tokens, counted on the CPU: no device sync."""
    if dat.spec is None:
        x, y = dat.loaders['train'].next()
        return to_device(x, env), to_device(y, env), None, y.numel()
    x, y, w = dat.loaders['train'].batch(step)
    return to_device(x, env), to_device(y, env), to_device(w, env), int(w.sum())


def to_device(t, env):  # pinned on CUDA: the copy overlaps compute
    if env.cuda:
        t = t.pin_memory()
    return t.to(env.device, non_blocking=True)


# ----------------------------------------------------------------------------- model, optimizer
def make_optimizer(model, tcfg, env):
    def cosine(step):  # lr factor: linear warm-up, then cosine to 0
        if step < tcfg.warmup_iters:
            return (step + 1) / tcfg.warmup_iters
        return 0.5 * (1 + math.cos(math.pi * min(1.0, step / tcfg.max_iters)))
    optimizer = torch.optim.Adam(model.parameters(), lr=tcfg.lr, fused=env.cuda)
    if tcfg.schedule == 'plateau':               # halve the lr when val loss stalls
        scheduler = ReduceLROnPlateau(optimizer, factor=0.5, patience=4)   # 4 evaluations
    else:
        scheduler = LambdaLR(optimizer, cosine)
    return optimizer, scheduler


# ---------------------------------------------------------------------------- checkpoints, restarts
# Checkpoints and restarts: what a training run writes so that it continues exactly, and where a
# starting process begins. Only rank 0 writes, into out_dir:
#   ckpt.pt  the latest state: weights, optimizer, schedule, step, configs, the flags that made the
#            run, every rank's RNG and LM memory, the stream position, the data's digests
#   best.pt  the same, at the best validation loss
#   lock     locked by rank 0 while it trains; the operating system releases it when the process
#            ends, however it ends
# --resume auto (the default) continues ckpt.pt when the same flags made it, which is what a
# torchrun restart does (it reruns the same command); --resume true continues it with new loop
# knobs (RESUMABLE); --resume false starts anew. A problem ends in one line (exit 2).

# what a resumed run may change: the loop's knobs, never the model, the data or the streams
RESUMABLE = ('mode', 'lr', 'warmup_iters', 'grad_clip', 'max_iters', 'eval_interval',
             'eval_examples', 'eval_tokens', 'log_interval', 'device', 'dtype', 'compile',
             'out_dir', 'resume', 'skip_nonfinite', 'dropout', 'dropatt')


def load_checkpoint(path, resume=False):
    """The checkpoint dict at path (on the CPU); resume: it must hold a whole training state."""
    if not os.path.isfile(path):
        if resume:
            die(f'no checkpoint to resume at {path}: start without --resume or fix --out_dir')
        die(f'no checkpoint at {path}: give the path of one (train.py writes OUT_DIR/ckpt.pt)')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        die(f'{path} is not a readable checkpoint ({type(e).__name__}): use another file')
    if not isinstance(ckpt, dict) or not {'model', 'model_cfg', 'train_cfg'} <= ckpt.keys():
        die(f'{path} is not a checkpoint of this codebase: use another file')
    lacks = {'optimizer', 'scheduler', 'step', 'best_val', 'ranks', 'data', 'loader'} - ckpt.keys()
    if resume and lacks:
        die(f"{path} holds no complete training state (no "
            f"{', '.join(sorted(lacks))}): start a new run with --resume false "
            'or another --out_dir')
    return ckpt


def run_flags(given):  # the flags that make a run what it is: not where it lives, nor how it starts
    return {k: v for k, v in given.items() if k not in ('resume', 'out_dir')}


def choose_start(given, out_dir):
    """-> (checkpoint or None, its path, resuming?). Training continues out_dir's ckpt.pt with
    --resume true, and with auto when the same flags made that run; auto starts anew when out_dir
    holds no run and refuses when it holds another, so nothing is replaced without --resume false.
    A new run or --mode eval starts from the weights of --init_from, if given."""
    how, init = given.get('resume', 'auto'), given.get('init_from', '')
    if how not in ('auto', 'true', 'false'):
        die(f"--resume takes auto, true or false, not '{how}'")
    last = os.path.join(out_dir, 'ckpt.pt')
    if how == 'true' and init:
        die('--resume continues the run in --out_dir, --init_from starts a new one: give one')
    if given.get('mode') == 'eval' and not init and how != 'true':
        die(f'--mode eval evaluates a checkpoint: give --init_from PATH (for example {last})')
    if how == 'true':
        run = load_checkpoint(last, resume=True)
        settings = {**run['train_cfg'], **run['model_cfg']}
        for k, v in given.items():
            if k not in RESUMABLE and v != settings.get(k, v):
                die(f'--{k} cannot change when a run resumes ({last} has '
                    f'{settings[k]!r}): drop the flag, or start a new run with '
                    '--resume false or another --out_dir')
        return run, last, True
    if given.get('mode', 'train') == 'train' and how == 'auto' and os.path.exists(last):
        run = load_checkpoint(last, resume=True)
        flags, theirs = run_flags(given), run.get('flags', {})
        diff = sorted(k for k in flags.keys() | theirs.keys() if flags.get(k) != theirs.get(k))
        if diff or 'flags' not in run:
            die(f"{last} holds a run made with other flags "
                f"({', '.join(diff) or 'unknown'}): continue it with --resume "
                'true, replace it with --resume false, or give another --out_dir')
        return run, last, True
    if init:
        return load_checkpoint(init), init, False
    return None, '', False


def claim_out_dir(out_dir, env):
    """Rank 0 of a training run checks at start that out_dir is writable and locks it while this
    process lives, so that a second run there stops at once. The operating system releases the
    lock when the process ends, SIGKILL included: a restart is never blocked. Temp files of
    writes that a kill interrupted are removed (no other run writes here)."""
    if not env.master:
        return None
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(os.path.join(out_dir, 'lock'), 'w')
    except OSError as e:
        die(f'cannot write to --out_dir {out_dir} ({e.strerror}): give a writable one')
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        die(f'another run is training in {out_dir}: let it end, or give another --out_dir')
    for name in os.listdir(out_dir):
        if '.pt.tmp' in name:
            os.remove(os.path.join(out_dir, name))
    return lock                                  # kept open: closing it would release the lock


def agree_on_start(step, env):
    """Only rank 0 writes checkpoints, so every node must see the same out_dir (a shared file
    system). Ranks that would resume different steps (or one none) stop together, here."""
    steps = [step] * env.world
    if env.ddp:
        dist.all_gather_object(steps, step)
    if len(set(steps)) > 1:
        die(f'the ranks see different checkpoints in --out_dir (steps {steps}):'
            ' every node must see the same --out_dir, on a shared file system')


def restore(ckpt, path, given, optimizer, scheduler, dat, tcfg, env):
    """Training state of a checkpoint, for this rank -> (step, best val loss, LM memory). The
    weights are loaded by the caller, as for --init_from."""
    if len(ckpt['ranks']) != env.world:
        die(f"{path} was written by {len(ckpt['ranks'])} processes: resume with as many")
    if ckpt['data'] != dat.checksums:            # older versions stored only LM split lengths
        die(f'the data differ from those {path} was trained on (another file '
            'or other contents): restore them, or start a new run with '
            '--resume false or another --out_dir')
    mine = ckpt['ranks'][env.rank]
    optimizer.load_state_dict(ckpt['optimizer'])
    scheduler.load_state_dict(ckpt['scheduler'])
    if 'lr' in given:                            # a new --lr wins over the checkpoint's
        optimizer.param_groups[0]['lr'], scheduler.base_lrs = tcfg.lr, [tcfg.lr]
    torch.set_rng_state(mine['rng'])
    if env.cuda and mine['cuda_rng'] is not None:
        torch.cuda.set_rng_state(mine['cuda_rng'])
    dat.loaders['train'].load_state_dict(ckpt['loader'])
    return ckpt['step'], ckpt['best_val'], [memory.to_device(s, env.device) for s in mine['memory']]


def save_checkpoint(name, step, best_val, states, flags, model, optimizer, scheduler, mcfg, tcfg,
                    dat, env):
    """All it takes to continue exactly. Every rank sends its RNG and memory, rank 0 writes:
    temp file, fsync, rename, so that a crash never leaves a torn checkpoint."""
    mine = dict(rng=torch.get_rng_state(), memory=[], cuda_rng=None)
    if env.cuda:
        mine['cuda_rng'] = torch.cuda.get_rng_state()
    for s in states:                             # plain tuples: weights_only reads no namedtuple
        mine['memory'].append(None if s is None else tuple(memory.to_device(s, 'cpu')))
    ranks = [mine] * env.world
    if env.ddp:
        dist.all_gather_object(ranks, mine)
    if not env.master:
        return
    dest = os.path.join(tcfg.out_dir, name)
    tmp = f'{dest}.tmp{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), model_cfg=asdict(mcfg),
                            train_cfg=asdict(tcfg), step=step, best_val=best_val, ranks=ranks,
                            data=dat.checksums, loader=dat.loaders['train'].state_dict(),
                            flags=flags), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except (OSError, RuntimeError) as e:         # torch.save reports a full disk as RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        kept = 'no checkpoint was written yet'
        if os.path.exists(dest):
            kept = f'{dest} holds the previous one, intact'
        die(f'could not write {dest} ({type(e).__name__}: '
            f'{str(e).splitlines()[0][:80]}): free disk space or change --out_dir; {kept}')


# ----------------------------------------------------------------------------- train, evaluate
def train_step(ddp_model, optimizer, states, batch, tcfg, env):
    """One optimizer step: grad_accum micro-steps, clip, update unless the gradient is not finite.
    Micro-step m trains rows m*B..(m+1)*B with the memory those rows left at the last step."""
    x, y, w = batch
    G, mean_loss = tcfg.grad_accum, 0.0
    weights = [None] * G if w is None else w.chunk(G)
    for micro, (xm, ym, wm) in enumerate(zip(x.chunk(G), y.chunk(G), weights)):
        # DDP: reduce the gradients once, after the last micro-step's backward
        sync = nullcontext()
        if env.ddp and micro < G - 1:
            sync = ddp_model.no_sync()
        with sync:
            with env.autocast:
                if w is None:                    # LM: the memory carried from the last step
                    nll, states[micro] = ddp_model(xm, states[micro], ym)
                    loss = nll.float().mean()
                else:                            # algorithmic: each example from scratch
                    nll, _ = ddp_model(xm, None, ym)
                    loss = (nll.float() * wm).sum() / wm.sum()
            # equal chunks: the mean of the chunks' means is the mean over the whole batch
            env.scaler.scale(loss / G).backward()
        mean_loss = mean_loss + loss.detach() / G
    env.scaler.unscale_(optimizer)
    gnorm = torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), tcfg.grad_clip or math.inf)
    finite = bool(torch.isfinite(gnorm))
    if finite or env.scaler.is_enabled():        # fp16: the scaler skips the step itself and
        env.scaler.step(optimizer)               # halves its scale
        env.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss, gnorm, finite


def evaluate(model, split, dat, tcfg, env):
    """-> (loss, a line of metrics): algorithmic tasks teacher-forced and free-running accuracy,
    exact match; LM bpc (or perplexity for wt103), every scored token summed over the ranks."""
    model.eval()
    with torch.no_grad(), env.autocast:          # one autocast region: weights cast once
        if dat.spec is not None:
            sums, size = [0.0] * 8, 4 * tcfg.batch_size
            for x, y, w in dat.loaders[split].eval_batches(size, tcfg.eval_examples or None):
                batch = data.answer_metrics(model, x.to(env.device), y.to(env.device),
                                            w.to(env.device), dat.spec['ans_len'],
                                            dat.spec['score_len'])
                sums = [a + b for a, b in zip(sums, batch)]
            nll, n, n_ans, tf, fr, em, n_none, em_none = reduce(sums, env)
            n_ex = n_ans / dat.spec['score_len']
            res = dict(loss=nll / n, acc_tf=tf / n_ans, acc_free=fr / n_ans, exact=em / n_ex,
                       n=int(n_ex))
            if tcfg.task == 'sqeq':              # with real roots, and without (empty answer)
                res['exact_roots'] = (em - em_none) / max(n_ex - n_none, 1)
                res['exact_none'] = em_none / max(n_none, 1)
                res['n_none'] = int(n_none)
        else:                                    # memory carried through each rank's streams
            state, nll, n = None, 0.0, 0
            for x, y in dat.loaders[split].eval_windows(model.cfg.seg_len,
                                                        tcfg.eval_tokens or None):
                out, state = model(x.to(env.device), state, y.to(env.device))
                nll, n = nll + out.sum().item(), n + out.numel()
            nll, n = reduce([nll, n], env)
            res = dict(loss=nll / n, n=int(n))
            if tcfg.task == 'wt103':
                res['ppl'] = math.exp(nll / n)
            else:
                res['bpc'] = nll / n / math.log(2)
    model.train()
    line = ' | '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}'
                      for k, v in res.items())
    return res['loss'], line


def stop_final_test(signum, frame):
    die('stopped by a signal in the final test; every checkpoint is written: `--mode eval '
        '--init_from OUT_DIR/ckpt.pt` runs the test', code=128 + signum)


# ----------------------------------------------------------------------------- main
def main(argv):
    if '--help' in argv or '-h' in argv:
        for c in (ModelConfig, TrainConfig):     # the data set vocab_size and cutoffs
            flags = [f for f in fields(c) if f.name not in FROM_DATA]
            print(' '.join(f'--{f.name} {f.default!r}' for f in flags))
        return
    # config: defaults <- preset <- flags, or a checkpoint's configs <- flags
    given = parse_flags(argv)
    ckpt, path, resuming = choose_start(given, given.get('out_dir', TrainConfig.out_dir))
    mcfg, tcfg, why = make_configs(given, ckpt, path, resuming)
    env = setup(tcfg)
    agree_on_start(ckpt['step'] if resuming else 0, env)
    if tcfg.mode == 'train':
        env.print(f'preset {tcfg.preset} ({why})')
        lock = claim_out_dir(tcfg.out_dir, env)  # held until this process ends
    dat = load_data(tcfg, mcfg, env)
    check_fits(mcfg, tcfg, dat, env)
    model = MemTransformer(mcfg).to(env.device)
    optimizer, scheduler = make_optimizer(model, tcfg, env)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt['model'])
        except RuntimeError:
            die(f'{path} does not fit this model (other size or vocabulary): '
                'give the matching flags or another checkpoint')
    # LM: each micro-step's streams carry their memory from step to step
    start, best_val, states = 0, float('inf'), [None] * tcfg.grad_accum
    if resuming:
        start, best_val, states = restore(ckpt, path, given, optimizer, scheduler, dat, tcfg, env)
        env.print(f'resuming {path} at step {start} of {tcfg.max_iters}')
    if tcfg.compile:     # each segment is one graph; shapes settle after the first segments
        model.segment = torch.compile(model.segment)
    ddp_model = model
    if env.ddp:  # no buffers to broadcast: memory is passed in and out of forward; on LM streams
        # the initial RMT memory is unused after the first step (the carried memory replaces it)
        ddp_model = DDP(model, device_ids=[env.device] if env.cuda else None,
                        find_unused_parameters=mcfg.n_mem_tokens > 0 and dat.spec is None)
    if tcfg.mode == 'eval':
        env.print(f'eval: arch {mcfg.arch} | seg_len {mcfg.seg_len} | mem_len {mcfg.mem_len} | '
                  f'n_mem_tokens {mcfg.n_mem_tokens} | clamp_len {mcfg.clamp_len}')
        for split in ('val', 'test'):
            line = evaluate(model, split, dat, tcfg, env)[1]   # every rank evaluates its share
            env.print(f'{split}: {line}')
    if tcfg.mode != 'train':
        return
    # ------------------------------------------------------------------------- training loop
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    env.print(f'task {tcfg.task} | arch {mcfg.arch} | {n_params:.2f}M params | '
              f'world {env.world} | device {env.device}')
    flags = run_flags(given)                     # stored with the run, for --resume auto
    if resuming:
        flags = {**ckpt.get('flags', {}), **flags}
    ckpt_args = (flags, model, optimizer, scheduler, mcfg, tcfg, dat, env)
    signals = []                                 # SIGINT/SIGTERM: checkpoint, then exit
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: signals.append(signum))
    t0, n_tok, n_seen, skipped = time.time(), 0, 0, 0
    for step in range(start + 1, tcfg.max_iters + 1):
        x, y, w, n = get_batch(dat, step - 1, env)
        loss, gnorm, ok = train_step(ddp_model, optimizer, states, (x, y, w), tcfg, env)
        n_tok, n_seen = n_tok + n, n_seen + x.numel()
        # a non-finite gradient: no update (the same on every rank: gradients are reduced)
        if not ok:
            states = [None] * tcfg.grad_accum
            # fp16: an overflow at a loss scale above 1 may be the scale's fault (it was halved):
            # not counted; one at scale 1 or below is the model's
            if not env.scaler.is_enabled() or env.scaler.get_scale() < 1:
                skipped += 1
            if skipped > tcfg.skip_nonfinite:    # name a checkpoint only if one exists
                last = os.path.join(tcfg.out_dir, 'ckpt.pt')
                fix = f'the last good checkpoint is {last}: resume it with --resume true'
                if not os.path.exists(last):
                    fix = 'no checkpoint was written yet: start over'
                die(f'non-finite loss or gradient at step {step}; {fix}, perhaps with a lower '
                    '--lr, or allow --skip_nonfinite N', code=1)
            continue
        if tcfg.schedule == 'cosine':
            scheduler.step()
        if step % tcfg.log_interval == 0 and env.master:
            dt = time.time() - t0
            print(f'step {step} | loss {loss.item():.4f} | lr {optimizer.param_groups[0]["lr"]:.2e}'
                  f' | gnorm {gnorm.item():.2f} | {1000 * dt / tcfg.log_interval:.0f} ms/step | '
                  f'{n_tok * env.world / dt:.0f} tok/s | {model.mfu(n_seen / dt, True, env.dtype)}',
                  flush=True)
            t0, n_tok, n_seen = time.time(), 0, 0
        if step % tcfg.eval_interval == 0 or step == tcfg.max_iters:
            t_val = time.time()
            val_loss, metrics = evaluate(model, 'val', dat, tcfg, env)
            if tcfg.schedule == 'plateau':
                scheduler.step(val_loss)
            env.print(f'val step {step}: {metrics} | {time.time() - t_val:.1f} s', flush=True)
            if val_loss < best_val:
                best_val = val_loss
                save_checkpoint('best.pt', step, best_val, states, *ckpt_args)
            save_checkpoint('ckpt.pt', step, best_val, states, *ckpt_args)
            t0 = time.time()
        # a signal on any rank: every rank stops at this step, after one checkpoint
        stop = len(signals)
        if env.ddp:
            stop = reduce([stop], env)[0]
        if stop:
            save_checkpoint('ckpt.pt', step, best_val, states, *ckpt_args)
            env.print(f'stopped by a signal at step {step}: the same command continues the run',
                      flush=True)
            leave(128 + (signals[0] if signals else signal.SIGTERM))
    # ------------------------------------------------------------------------- final test, cleanup
    for s in (signal.SIGINT, signal.SIGTERM):    # a signal now ends the run: all is saved
        signal.signal(s, stop_final_test)
    env.print(f"test: {evaluate(model, 'test', dat, tcfg, env)[1]}")


if __name__ == '__main__':
    main(sys.argv[1:])
    if dist.is_initialized():    # every rank is done with every collective before any leaves
        dist.barrier()
    leave(0)
