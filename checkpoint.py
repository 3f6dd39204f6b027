"""
Checkpoints and restarts: what a training run writes so that it continues exactly, and where a
starting process begins. Only rank 0 writes, into out_dir:
  ckpt.pt  the latest state: weights, optimizer, schedule, step, configs, the flags that made the
           run, every rank's RNG and LM memory, the stream position, the data's digests
  best.pt  the same, at the best validation loss
  lock     locked by rank 0 while it trains; the operating system releases it when the process
           ends, however it ends
--resume auto (the default) continues ckpt.pt when the same flags made it, which is what a
torchrun restart does (it reruns the same command); --resume true continues it with new loop
knobs (RESUMABLE); --resume false starts anew. A problem raises CheckpointError, which train.py
prints as one line (exit 2).
"""
import fcntl
import os
from dataclasses import asdict

import torch
import torch.distributed as dist

import memory

# what a resumed run may change: the loop's knobs, never the model, the data or the streams
RESUMABLE = ('mode', 'lr', 'warmup_iters', 'grad_clip', 'max_iters', 'eval_interval',
             'eval_examples', 'eval_tokens', 'log_interval', 'device', 'dtype', 'compile',
             'bench_iters', 'out_dir', 'resume', 'skip_nonfinite', 'sample_len', 'temperature',
             'top_k', 'prompt', 'dropout', 'dropatt')


class CheckpointError(Exception):
    """A missing, unreadable or mismatched checkpoint, or an out_dir that cannot be used."""


def load(path, resume=False):
    """The checkpoint dict at path (on the CPU); resume: it must hold a whole training state."""
    if not os.path.isfile(path):
        if resume:
            raise CheckpointError(f'no checkpoint to resume at {path}: start without --resume '
                                  'or fix --out_dir')
        raise CheckpointError(f'no checkpoint at {path}: train first, or pass --init_from PATH')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise CheckpointError(f'{path} is not a readable checkpoint ({type(e).__name__}): use '
                              'another file') from None
    if not isinstance(ckpt, dict) or not {'model', 'model_cfg', 'train_cfg'} <= ckpt.keys():
        raise CheckpointError(f'{path} is not a checkpoint of this codebase: use another file')
    lacks = {'optimizer', 'scheduler', 'step', 'best_val', 'ranks', 'data', 'loader'} - ckpt.keys()
    if resume and lacks:
        raise CheckpointError(f"{path} holds no complete training state (no "
                              f"{', '.join(sorted(lacks))}): start a new run with --resume false "
                              'or another --out_dir')
    return ckpt


def run_flags(given):  # the flags that make a run what it is: not where it lives, nor how it starts
    return {k: v for k, v in given.items() if k not in ('resume', 'out_dir')}


def choose_start(given, out_dir):
    """-> (checkpoint or None, its path, resuming?). Training continues out_dir's ckpt.pt with
    --resume true, and with auto when the same flags made that run; auto starts anew when out_dir
    holds no run and refuses when it holds another, so nothing is replaced without --resume false.
    A new run, --mode eval or sample starts from the weights of --init_from, if given."""
    how, init = given.get('resume', 'auto'), given.get('init_from', '')
    if how not in ('auto', 'true', 'false'):
        raise CheckpointError(f"--resume takes auto, true or false, not '{how}'")
    last = os.path.join(out_dir, 'ckpt.pt')
    if how == 'true' and init:
        raise CheckpointError('--resume continues the run in --out_dir, --init_from starts a new '
                              'one: give one of them')
    if how == 'true':
        run = load(last, resume=True)
        settings = {**run['train_cfg'], **run['model_cfg']}
        for k, v in given.items():
            if k not in RESUMABLE and v != settings.get(k, v):
                raise CheckpointError(f'--{k} cannot change when a run resumes ({last} has '
                                      f'{settings[k]!r}): drop the flag, or start a new run with '
                                      '--resume false or another --out_dir')
        return run, last, True
    if given.get('mode', 'train') == 'train' and how == 'auto' and os.path.exists(last):
        run = load(last, resume=True)
        flags, theirs = run_flags(given), run.get('flags', {})
        diff = sorted(k for k in flags.keys() | theirs.keys() if flags.get(k) != theirs.get(k))
        if diff or 'flags' not in run:
            raise CheckpointError(f"{last} holds a run made with other flags "
                                  f"({', '.join(diff) or 'unknown'}): continue it with --resume "
                                  'true, replace it with --resume false, or give another --out_dir')
        return run, last, True
    if init:
        return load(init), init, False
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
        raise CheckpointError(f'cannot write to --out_dir {out_dir} ({e.strerror}): give a '
                              'writable one') from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise CheckpointError(f'another run is training in {out_dir}: let it end, or give '
                              'another --out_dir') from None
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
        raise CheckpointError(f'the ranks see different checkpoints in --out_dir (steps {steps}):'
                              ' every node must see the same --out_dir, on a shared file system')


def restore(ckpt, path, given, optimizer, scheduler, dat, tcfg, env):
    """Training state of a checkpoint, for this rank -> (step, best val loss, LM memory). The
    weights are loaded by the caller, as for --init_from."""
    if len(ckpt['ranks']) != env.world:
        raise CheckpointError(f"{path} was written by {len(ckpt['ranks'])} processes: resume "
                              'with as many')
    if ckpt['data'] != dat.checksums:            # older versions stored only LM split lengths
        raise CheckpointError(f'the data differ from those {path} was trained on (another file '
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


def save(name, step, best_val, states, flags, model, optimizer, scheduler, mcfg, tcfg, dat, env):
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
        raise CheckpointError(f'could not write {dest} ({type(e).__name__}: '
                              f'{str(e).splitlines()[0][:80]}): free disk space or change '
                              f'--out_dir; {kept}') from None
