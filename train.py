"""The one entry point: train, evaluate or sample from (--mode) every architecture on every task,
on a CPU, one GPU or many GPUs; flags override the task's preset. No flags: RMT learns to copy.
  python train.py                                        # the quick copy run, minutes on a CPU
  python train.py --mode sample --init_from out/ckpt.pt  # what a trained model writes
  torchrun --standalone --nproc_per_node=8 train.py --task enwik8

Read from the top: the config and presets, a batch, the optimizer and schedule, one training
step, evaluation, generation, then `main` with the training loop. Below the banner after `main`
sits the machinery that a learner may skip: flags and validation, device and DDP set-up, data
checks, checkpoints, resume, the out_dir lock, rank agreement, signals and exit.
"""
import signal

if __name__ == '__main__':   # a signal while torch loads below: the default, an end at once
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # (exit 128 + the signal, no traceback)

import fcntl
import hashlib
import inspect
import json
import math
import os
import re
import resource
import sys
import textwrap
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

import data
import memory
from model import MemTransformer, ModelConfig, check_limits


# ----------------------------------------------------------------------------- config, presets
@dataclass
class TrainConfig:
    task: str = 'copy'         # copy | reverse | retrieval | sqeq | enwik8 | wt103 | text
    preset: str = ''           # a PRESETS key; '': copy_cpu, or with --task X: X on a GPU, X_cpu
    mode: str = 'train'        # train | eval (a checkpoint on val and test) | sample (generate)
    seq_len: int = 16          # copy, reverse: source length S (paper: 24, 40, 120, 240, 360)
    data_dir: str = 'data'     # where enwik8 / wt103 / text splits are prepared
    data_path: str = ''        # text: any local file, read as bytes
    batch_size: int = 32       # examples (or LM streams) per micro-step per process
    grad_accum: int = 1        # micro-steps per optimizer step
    lr: float = 1e-3           # Adam learning rate (peak, under cosine)
    schedule: str = 'cosine'   # cosine: linear warm-up, then cosine to 0 | plateau: constant,
    #                            halved when val loss stalls (the RMT paper's algorithmic runs)
    warmup_iters: int = 300    # cosine: linear warm-up steps
    grad_clip: float = 0.25    # max gradient norm (0 = off)
    max_iters: int = 3000      # optimizer steps
    eval_interval: int = 500   # steps between validations (and checkpoints)
    eval_examples: int = 1000  # algorithmic tasks: examples per evaluation (0 = whole split)
    stop_exact: float = 1.0    # algorithmic tasks: end training once val exact reaches this
    #                            (1.0: every validation answer right; 0 = run all max_iters)
    eval_tokens: int = 0       # LM tasks: tokens per rank per evaluation (0 = whole split)
    reset_memory: bool = False  # LM evaluation: every segment starts from fresh memory (rmt:
    #                            the learned tokens; xl: an empty cache), to show what the
    #                            memory carried from earlier segments is worth
    keep_every: int = 0        # also keep the checkpoint of each validation at a multiple of
    #                            this step as ckpt_STEP.pt, a learning curve's points (0 = none)
    log_interval: int = 250    # steps between log lines
    seed: int = 1337           # data, initialisation, dropout and sampling (per rank: + rank)
    device: str = 'auto'       # auto | cpu | cuda | cuda:N
    dtype: str = 'auto'        # float32 | bfloat16 | float16 autocast; auto: bf16 where it is fast
    compile: bool = False      # torch.compile each segment (GPU; minutes to compile on a CPU)
    out_dir: str = 'out'       # checkpoints: ckpt.pt (latest), best.pt (best validation)
    init_from: str = ''        # checkpoint to evaluate, sample or fine-tune ('' = scratch)
    resume: str = 'auto'       # auto: continue out_dir's run of this configuration, if any |
    #                            true (a bare --resume): continue it, flags may change the loop's
    #                            knobs | false: start anew, replacing out_dir's run
    skip_nonfinite: int = 0    # steps with a non-finite gradient to skip before stopping
    prompt: str = '\n'         # sample, LM tasks: the text to continue
    sample_len: int = 500      # sample, LM tasks: tokens to generate
    temperature: float = 0.9   # sample: divides the logits; 0 = greedy (always the argmax)
    top_k: int = 40            # sample: draw among the k most likely tokens (0 = all)

    def __post_init__(self):
        check_limits(self, TRAIN_LIMITS)


# the allowed values of each field (the device's depend on the machine: choose_device)
TRAIN_LIMITS = dict(task=data.ALGO_TASKS + data.LM_TASKS, mode=('train', 'eval', 'sample'),
                    schedule=('plateau', 'cosine'),
                    dtype=('auto', 'float32', 'bfloat16', 'float16'), seq_len='>= 1',
                    batch_size='>= 1', grad_accum='>= 1', lr='> 0', warmup_iters='>= 0',
                    grad_clip='>= 0', max_iters='>= 1', eval_interval='>= 1',
                    eval_examples='>= 0', stop_exact='[0, 1]', eval_tokens='>= 0',
                    keep_every='>= 0', log_interval='>= 1',
                    seed=f'[0, {2 ** 63 - 64})',  # numpy and torch seeds are 63-bit (+ the rank)
                    skip_nonfinite='>= 0', sample_len='>= 1', temperature='>= 0', top_k='>= 0')

# the settings of the RMT and Transformer-XL papers (GPU-days), and small ones that learn on 2
# CPU cores in minutes ('_cpu')
PAPER = dict(n_layer=4, d_model=128, n_head=4, d_head=64, d_inner=256, dropout=0.1, lr=1e-4,
             schedule='plateau', warmup_iters=0, batch_size=32, max_iters=250_000,
             eval_interval=5000, eval_examples=0)
NARROW = dict(d_model=64, d_head=32, d_inner=128)                     # retrieval
LM = dict(dropout=0.1, schedule='cosine', warmup_iters=0, bptt_depth=1, eval_tokens=0,
          lr=2.5e-4, eval_interval=4000, log_interval=200)  # language modelling: RMT paper
ENWIK8 = dict(LM, n_layer=12, d_model=512, n_head=8, d_head=64, d_inner=2048, batch_size=22,
              max_iters=400_000, seg_len=128, mem_len=128, n_mem_tokens=10)
LM_CPU = dict(LM, n_layer=4, d_model=128, n_head=4, d_head=32, d_inner=512, lr=1e-3,
              warmup_iters=100, batch_size=12, max_iters=2000, eval_interval=500,
              eval_tokens=20_000, seg_len=64, mem_len=40, n_mem_tokens=10, log_interval=250)
# The defaults are 'copy_cpu', the quick first run (under 2 minutes on 2 cores): a 16-symbol
# source, 48 input tokens in 3 segments of 16, 12 memory slots. Four findings set them. A warm-up:
# at a full lr of 1e-3 from step 1 the model sat at chance (loss 2.30) for ~1000 steps; with 300
# warm-up steps it leaves by ~350. Slack in what the memory can reach: write slot i sees source
# token j at distance T+i-j, so a head that prefers one distance fills the M slots with M
# consecutive tokens. 2 heads x 12 slots tile a 24-symbol source with no slack, and in about half
# the seeds a few positions were never stored (answered at chance for 2000+ steps: moving a head
# to them uncovers others); 4 heads of 16 (the same width), or 16 slots, each freed both seeds
# that were stuck. Batch 32: half the time per step, solved in about as many steps as batch 64.
# The source length: with 24 symbols and 16 slots, one seed in four still climbed slowly (solved
# at step 2500 of 3000, 190 s); with 16 symbols and 12 slots, 12 seeds of 12 were solved by step
# 1500 (README). The other algorithmic '_cpu' presets keep the settings of the README's results:
# copy's did not carry over to reverse (4 layers, batch 32, 4000 steps: test acc_free 0.40, 0.89
# and 0.997 in three seeds, against 0.999 for these settings over 8000 steps).
PLATEAU_CPU = dict(seq_len=24, seg_len=24, n_head=2, d_head=32, n_mem_tokens=12, mem_len=12,
                   batch_size=64, schedule='plateau', warmup_iters=0, max_iters=4000,
                   eval_interval=500, stop_exact=0)
PRESETS = {                              # a preset's task is its name without '_cpu'
    'copy': dict(PAPER, seq_len=24, seg_len=12, n_mem_tokens=6, mem_len=6),
    'reverse': dict(PAPER, seq_len=24, seg_len=12, n_mem_tokens=6, mem_len=6),
    'retrieval': dict(PAPER, **NARROW, n_layer=6, seg_len=5, n_mem_tokens=5, mem_len=5),
    'sqeq': dict(PAPER, n_layer=6, n_head=6, max_iters=600_000, seg_len=30, n_mem_tokens=30,
                 mem_len=30),
    'copy_cpu': dict(),                  # the defaults
    # 48 input tokens: 2 segments of 24
    'reverse_cpu': dict(PLATEAU_CPU, n_layer=4, n_head=4, max_iters=8000),
    'retrieval_cpu': dict(PLATEAU_CPU, n_layer=3, seg_len=3, n_mem_tokens=3, mem_len=3,
                          batch_size=256),
    'sqeq_cpu': dict(PLATEAU_CPU, seg_len=30, n_mem_tokens=30, mem_len=30, batch_size=32,
                     eval_examples=500),
    'enwik8': ENWIK8, 'text': ENWIK8,
    'wt103': dict(LM, n_layer=16, d_model=410, n_head=10, d_head=41, d_inner=2100, batch_size=60,
                  max_iters=200_000, seg_len=150, mem_len=150, n_mem_tokens=25, bptt_depth=2),
    'enwik8_cpu': LM_CPU, 'text_cpu': dict(LM_CPU, eval_tokens=0),
    'wt103_cpu': dict(LM_CPU, seg_len=32, mem_len=32),
}


# ----------------------------------------------------------------------------- a batch
def get_batch(dataset, step, env):
    """Step's rows x, y and answer weights w (LM: the streams' next window, w None) on the
    device, and the trained tokens, counted on the CPU: no device sync. One step holds
    batch_size * grad_accum examples (or LM streams) per rank; an LM window is bptt_depth + 1
    segments of each stream, which continues where the last step's window ended."""
    if dataset.spec is None:
        x, y = dataset.loaders['train'].next()
        return to_device(x, env), to_device(y, env), None, y.numel()
    x, y, w = dataset.loaders['train'].batch(step)
    return to_device(x, env), to_device(y, env), to_device(w, env), int(w.sum())


# ----------------------------------------------------------------------------- optimizer
def make_optimizer(model, train_cfg, env):
    """Adam (the papers' optimizer) and the schedule of its learning rate."""
    def cosine(step):  # lr factor: linear warm-up, then cosine to 0
        if step < train_cfg.warmup_iters:
            return (step + 1) / train_cfg.warmup_iters
        return 0.5 * (1 + math.cos(math.pi * min(1.0, step / train_cfg.max_iters)))
    optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.lr, fused=env.cuda)
    if train_cfg.schedule == 'plateau':          # halve the lr when val loss stalls
        scheduler = ReduceLROnPlateau(optimizer, factor=0.5, patience=4)   # 4 evaluations
    else:
        scheduler = LambdaLR(optimizer, cosine)
    return optimizer, scheduler


# ----------------------------------------------------------------------------- one training step
def train_step(ddp_model, optimizer, states, batch, train_cfg, env):
    """One optimizer step: grad_accum micro-steps, clip, update unless the gradient is not finite.
    Micro-step m trains rows m*B..(m+1)*B with the memory those rows left at the last step
    (states[m]; Transformer-XL's batch_chunk). -> (mean loss, gradient norm, finite?)"""
    x, y, w = batch
    grad_accum, mean_loss = train_cfg.grad_accum, 0.0
    weights = [None] * grad_accum
    if w is not None:
        weights = w.chunk(grad_accum)
    for micro, (xm, ym, wm) in enumerate(zip(x.chunk(grad_accum), y.chunk(grad_accum), weights)):
        # DDP: reduce the gradients once, after the last micro-step's backward
        sync = nullcontext()
        if env.ddp and micro < grad_accum - 1:
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
            env.scaler.scale(loss / grad_accum).backward()
        mean_loss = mean_loss + loss.detach() / grad_accum
    env.scaler.unscale_(optimizer)
    gnorm = torch.nn.utils.clip_grad_norm_(ddp_model.parameters(),
                                           train_cfg.grad_clip or math.inf)
    finite = bool(torch.isfinite(gnorm))
    if finite or env.scaler.is_enabled():        # fp16: the scaler skips the step itself and
        env.scaler.step(optimizer)               # halves its scale
        env.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss, gnorm, finite


# ----------------------------------------------------------------------------- evaluation
def evaluate(model, split, dataset, train_cfg, env):
    """-> {'loss': .., metric: ..}: algorithmic tasks teacher-forced and free-running accuracy,
    exact match; LM bpc (or perplexity for wt103), every scored token summed over the ranks."""
    model.eval()
    with torch.no_grad(), env.autocast:          # one autocast region: weights cast once
        if dataset.spec is not None:
            spec, sums, size = dataset.spec, [0.0] * 8, 4 * train_cfg.batch_size
            loader, limit = dataset.loaders[split], train_cfg.eval_examples or None
            progress = data.Progress(split, loader.eval_size(limit), env.master)
            for x, y, w in loader.eval_batches(size, limit):
                progress.update(len(x))
                batch = data.answer_metrics(model, x.to(env.device), y.to(env.device),
                                            w.to(env.device), spec['ans_len'], spec['score_len'])
                sums = [a + b for a, b in zip(sums, batch)]
            nll, n, n_ans, tf, fr, em, n_none, em_none = reduce(sums, env)
            n_ex = n_ans / spec['score_len']
            res = dict(loss=nll / n, acc_tf=tf / n_ans, acc_free=fr / n_ans, exact=em / n_ex,
                       n=int(n_ex))
            if train_cfg.task == 'sqeq':         # with real roots, and without (empty answer)
                res['exact_roots'] = (em - em_none) / max(n_ex - n_none, 1)
                res['exact_none'] = em_none / max(n_none, 1)
                res['n_none'] = int(n_none)
        else:                                    # memory carried through each rank's streams
            stream, limit = dataset.loaders[split], train_cfg.eval_tokens or None
            blocks = stream_nll(model, stream, model.cfg.seg_len, limit, env.device,
                                data.Progress(split, stream.eval_size(limit), env.master),
                                carry=not train_cfg.reset_memory)
            nll, n = reduce(blocks.sum(0).tolist(), env)
            res = dict(loss=nll / n, n=int(n))
            if train_cfg.task == 'wt103':
                res['ppl'] = math.exp(nll / n)
            else:
                res['bpc'] = nll / n / math.log(2)
    model.train()
    return res


def format_metrics(res):  # 'loss 1.2345 | acc_tf 0.9000 | n 1000'
    return ' | '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}'
                      for k, v in res.items())


def stream_nll(model, stream, seg_len, max_tokens, device, progress, carry=True):
    """Language-model evaluation as in Transformer-XL: a data.Stream's rows read window after
    window of seg_len tokens from the start, the memory carried across windows (carry=False:
    every window starts afresh), every target scored once (up to max_tokens per rank). The
    caller sets the precision (autocast or not).
    -> (N, 2) float64 on the CPU, one row per (stream, window): NLL sum, tokens."""
    state, blocks = None, []
    for x, y in stream.eval_windows(seg_len, max_tokens):
        progress.update(x.size(1))               # a line on stderr every 10 s
        nll, state = model(x.to(device), state if carry else None, y.to(device))  # (B, w)
        sums = nll.double().sum(1)                                                # (B,)
        blocks.append(torch.stack([sums, torch.full_like(sums, nll.size(1))], 1))  # (B, 2)
    return torch.cat(blocks).cpu()               # .cpu() waits for a GPU: callers may time it


# ----------------------------------------------------------------------------- generation
def sample(model, dataset, train_cfg, env):
    """--mode sample: what a trained model writes, generated segment by segment with the memory
    carried exactly as in training (MemTransformer.generate). LM tasks continue --prompt by
    --sample_len tokens; algorithmic tasks show three test examples: input, truth and the
    model's answer. --temperature 0 is greedy; the draws follow --seed. Rank 0 only."""
    if not env.master:
        return
    model.eval()
    gen = torch.Generator(env.device).manual_seed(train_cfg.seed)
    how = dict(temperature=train_cfg.temperature, top_k=train_cfg.top_k, generator=gen)
    with env.autocast:
        if dataset.spec is None:
            prompt = torch.as_tensor(dataset.corpus.encode(train_cfg.prompt), device=env.device)
            out = model.generate(prompt[None], train_cfg.sample_len, **how)        # (1, n)
            print(dataset.corpus.decode(torch.cat([prompt[None], out], 1)), flush=True)
            return
        ans_len = dataset.spec['ans_len']
        x, y, _ = next(dataset.loaders['test'].eval_batches(3, 3))
        question = x[:, :x.size(1) - ans_len + 1].to(env.device)
        answer = model.generate(question, ans_len, **how).cpu()                   # (3, ans_len)
    for i in range(len(x)):
        right = int((answer[i] == y[i, -ans_len:]).sum())
        print(f'input   {data.show_example(train_cfg.task, question[i])}\n'
              f'truth   {data.show_example(train_cfg.task, y[i, -ans_len:])}\n'
              f'model   {data.show_example(train_cfg.task, answer[i])}  '
              f'({right} of {ans_len} right)\n', flush=True)


# ----------------------------------------------------------------------------- main
def main(argv):
    if '--help' in argv or '-h' in argv:
        return print_help()
    # config: defaults <- preset <- flags, or a checkpoint's configs <- flags
    given = parse_flags(argv, (ModelConfig, TrainConfig), refused=FROM_DATA)
    ckpt, path, resuming = choose_start(given, given.get('out_dir', TrainConfig.out_dir))
    model_cfg, train_cfg, why = make_configs(given, ckpt, path, resuming)
    env = setup(train_cfg)
    agree_on_start(ckpt['step'] if resuming else 0, env)
    if train_cfg.mode == 'train':
        env.print(f'preset {train_cfg.preset} ({why}) | {describe(env)}')
        lock = claim_out_dir(train_cfg.out_dir, env)  # held until this process ends
    dataset = load_data(train_cfg, model_cfg, env)
    check_same_data(ckpt, path, dataset, train_cfg, given)
    check_fits(model_cfg, train_cfg, dataset, env)
    model = MemTransformer(model_cfg).to(env.device)
    optimizer, scheduler = make_optimizer(model, train_cfg, env)
    if ckpt is not None:
        load_weights(model, ckpt, path)
    # LM: each micro-step's streams carry their memory from step to step
    start, best_val, states = 0, float('inf'), [None] * train_cfg.grad_accum
    if resuming:
        start, best_val, states = restore(ckpt, path, given, optimizer, scheduler, dataset,
                                          train_cfg, env)
    ddp_model = wrap(model, model_cfg, train_cfg, dataset, env)   # --compile, DDP
    if train_cfg.mode == 'eval':
        return evaluate_checkpoint(model, dataset, train_cfg, env)
    if train_cfg.mode == 'sample':
        return sample(model, dataset, train_cfg, env)
    # ------------------------------------------------------------------------- training loop
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    env.print(f'task {train_cfg.task} | arch {model_cfg.arch} | {n_params:.2f}M params | '
              f'world {env.world} | device {env.device}')
    to_save = (run_flags(given, ckpt, resuming), model, optimizer, scheduler, model_cfg,
               train_cfg, dataset, env)          # what a checkpoint holds besides the loop's state
    signals, skipped, log = Signals(env), 0, Log(model, env, train_cfg.out_dir, start)
    step = start                                 # the last step trained
    for step in range(start + 1, train_cfg.max_iters + 1):
        x, y, w, n_tokens = get_batch(dataset, step - 1, env)
        loss, gnorm, finite = train_step(ddp_model, optimizer, states, (x, y, w), train_cfg, env)
        log.count(n_tokens, x.numel())
        if not finite:       # no update was made: skip the step, or stop with one line
            skipped = count_nonfinite(step, skipped, train_cfg, env)
            states = [None] * train_cfg.grad_accum       # that step's memory is not finite
            continue
        if train_cfg.schedule == 'cosine':
            scheduler.step()
        if step % train_cfg.log_interval == 0 or step == train_cfg.max_iters:
            log.step(step, loss, gnorm, optimizer.param_groups[0]['lr'])
        if step % train_cfg.eval_interval == 0 or step == train_cfg.max_iters:
            t_val = time.time()
            with signals.abandoning(step, best_val, states, to_save):   # Ctrl-C: stop at once
                val = evaluate(model, 'val', dataset, train_cfg, env)
            if train_cfg.schedule == 'plateau':
                scheduler.step(val['loss'])
            log.result(f'val step {step}', val, step, time.time() - t_val)
            if val['loss'] < best_val:
                best_val = val['loss']
                save_checkpoint('best.pt', step, best_val, states, *to_save)
            solved = val.get('exact', 0) >= train_cfg.stop_exact > 0
            save_checkpoint('ckpt.pt', step, best_val, states, *to_save, solved=solved)
            if train_cfg.keep_every and step % train_cfg.keep_every == 0:   # a curve's points
                save_checkpoint(f'ckpt_{step}.pt', step, best_val, states, *to_save)
            log.exclude(time.time() - t_val)     # the speed is the training steps' alone
            if solved and step < train_cfg.max_iters:   # algorithmic: nothing left to learn
                env.print(f'solved: val exact {val["exact"]:.4f} >= --stop_exact '
                          f'{train_cfg.stop_exact:g} at step {step}, so training ends before '
                          f'--max_iters {train_cfg.max_iters}')
                break
        stop_on_signal(signals, step, best_val, states, to_save)
    catch_signals(stop_final_test)               # a signal now ends the run: all is saved
    log.result('test', evaluate(model, 'test', dataset, train_cfg, env), step)


# =============================================================================================
# The machinery: everything below keeps runs safe and convenient (flags, validation, devices,
# DDP, data checks, checkpoints, resume, locks, signals). A learner may stop reading here.
# =============================================================================================

# ----------------------------------------------------------------------------- flags, validation
# what the data decide, never a flag: the vocabulary and its adaptive-softmax clusters
FROM_DATA = ('vocab_size', 'cutoffs')
BOOLEANS = {'true': True, '1': True, 'false': False, '0': False}


def die(msg, code=2):  # bad input ends in one line that names the fix, exit 2, no traceback
    print(f'error: {msg}', file=sys.stderr)
    leave(code)


def parse_flags(argv, configs, positional=None, refused=()):
    """Every field of the dataclasses `configs` is a flag: --name value or --name=value; a bare
    boolean (or --resume) means true; a flag given twice takes its last value. -> {name: value}
    of the flags given. `positional`: a field that may also be given as a plain argument
    (trams.py's checkpoint); `refused`: fields that are no flags (the data set them)."""
    types = {f.name: f.type for c in configs for f in fields(c)}
    args, given = list(argv), {}
    while args:
        arg = args.pop(0)
        if positional and not arg.startswith('--') and positional not in given:
            given[positional] = arg
            continue
        name, eq, val = arg.removeprefix('--').partition('=')
        typ = types.get(name) if arg.startswith('--') else None
        if typ is None:
            die(f"unknown flag '{arg}': flags are --name value with a name from "
                f"{' or '.join(c.__name__ for c in configs)} (--help lists them)")
        if name in refused:
            die(f"--{name} is set by the task's data: drop the flag")
        next_is_value = args and not args[0].startswith('--')
        if typ is bool and next_is_value and (positional is None or positional in given):
            next_is_value = True                 # --compile maybe: a bad value, said so below
        elif typ is bool and next_is_value:
            next_is_value = args[0].lower() in BOOLEANS   # else the bare flag, then an argument
        if not eq and not next_is_value and (typ is bool or name == 'resume'):
            val = 'true'                         # a bare boolean (or --resume) means true
        elif not eq:
            val = args.pop(0) if args else die(f'flag --{name} needs a value')
        try:
            if typ is bool:
                given[name] = BOOLEANS[val.lower()]
            elif typ is tuple:
                given[name] = tuple(int(v) for v in val.split(',') if v)
            else:
                given[name] = typ(val)
        except (KeyError, ValueError):
            kind = {tuple: 'comma-separated integers', bool: 'true or false'}.get(typ,
                                                                             f'a {typ.__name__}')
            die(f"--{name} expects {kind}, got '{val}'")
    return given


def print_help(configs=(ModelConfig, TrainConfig), usage=__doc__, presets=True):
    """--help: the usage, one line per flag with its default and meaning (the field's comment),
    grouped by dataclass, and the presets."""
    print(usage.strip().split('\n\n')[0])              # the docstring's first paragraph
    for config in configs:
        print(f'\n{config.__name__} flags (--name value):')
        comments = field_comments(config)
        for f in fields(config):
            if f.name not in FROM_DATA:
                flag = f'  --{f.name} {f.default!r}'.ljust(30)
                print(textwrap.fill(f'{flag} {comments.get(f.name, "")}', 100,
                                    subsequent_indent=' ' * 31))
    if presets:
        print(textwrap.fill(f"\n--preset: {', '.join(PRESETS)} (flags override the preset's "
                            'values)', 100, subsequent_indent=' ' * 10, replace_whitespace=False))


def field_comments(config):  # field name -> its trailing comment and the comment lines after it
    comments, name = {}, None
    for line in inspect.getsource(config).splitlines():
        field_line = re.match(r'\s+(\w+): [^#]*#\s?(.*)', line)
        more = re.match(r'\s+#\s*(.*)', line)
        if field_line:
            name = field_line.group(1)
            comments[name] = field_line.group(2).strip()
        elif more and name:
            comments[name] += ' ' + more.group(1).strip()
        else:
            name = None
    return comments


def choose_preset(given):  # -> (preset name, why it was chosen: the log's first line says)
    if given.get('preset'):
        return given['preset'], 'given by --preset'
    if 'task' not in given:      # the quickstart: quick on every device, a GPU included
        return 'copy_cpu', 'no --task or --preset: the quick copy run'
    task = given['task']
    if task not in TRAIN_LIMITS['task']:
        die(f"unknown task '{task}': use one of {', '.join(TRAIN_LIMITS['task'])}")
    cuda = torch.cuda.is_available() and given.get('device', 'auto') != 'cpu'
    if cuda and task in PRESETS:
        return task, f'--task {task} on a GPU: the paper setting; --preset {task}_cpu is small'
    return f'{task}_cpu', f'--task {task} on a CPU: the small setting; --preset {task} is the paper'


def make_configs(given, ckpt=None, path='', resuming=False):
    """-> (ModelConfig, TrainConfig, why): defaults <- preset <- flags, or a checkpoint's <- flags
    (choose_start has checked what a resumed run may change). Each config checks its own fields;
    check_together the rules between them. A run that starts from --init_from weights writes to
    its own --out_dir, never into the checkpoint's."""
    if ckpt is not None:
        model_fields, train_fields, preset = dict(ckpt['model_cfg']), dict(ckpt['train_cfg']), {}
        train_fields.pop('resume', None)
        if not resuming:
            train_fields['out_dir'] = TrainConfig.out_dir
        arch, task = model_fields.get('arch'), train_fields.get('task')
        if given.get('arch', arch) != arch:
            die(f"the checkpoint holds an '{arch}' model, not '{given['arch']}': "
                'drop --arch or use another checkpoint')
        if (given.get('task', task) in data.LM_TASKS) != (task in data.LM_TASKS):
            die(f"{path} holds a model of the {task} task, which cannot run --task "
                f"{given['task']} (language modelling and algorithmic tasks differ): drop --task")
        why = f'from {path}'
    else:
        name, why = choose_preset(given)
        if name not in PRESETS:
            die(f"unknown preset '{name}': use one of {', '.join(PRESETS)}")
        model_fields, preset = {}, PRESETS[name]
        train_fields = dict(preset=name, task=name.removesuffix('_cpu'))
        kind = train_fields['task'] in data.LM_TASKS  # enwik8's model may learn any text
        if (given.get('task', train_fields['task']) in data.LM_TASKS) != kind:
            die(f"--preset {name} is for --task {train_fields['task']}, not {given['task']} "
                '(language modelling and algorithmic tasks differ): drop one of them')
    for k, v in {**preset, **given}.items():
        if k in TrainConfig.__dataclass_fields__:
            train_fields[k] = v
        else:
            model_fields[k] = v
    try:
        train_cfg = TrainConfig(**train_fields)
        model_cfg = ModelConfig(**model_fields)
        check_together(model_cfg, train_cfg, given)
    except (TypeError, ValueError) as e:
        where = ''
        if ckpt is not None:                     # the checkpoint's configuration, or a flag
            where = f'{path} with the flags given: '
        die(f'{where}{e}')
    return model_cfg, train_cfg, why


# flags that only one mode reads: given in another, they would be ignored, so they are refused
TRAINING_ONLY = ('lr', 'schedule', 'warmup_iters', 'grad_clip', 'max_iters', 'eval_interval',
                 'stop_exact', 'keep_every', 'log_interval', 'grad_accum', 'skip_nonfinite',
                 'aux_mem_loss', 'bptt_depth', 'grad_checkpoint', 'dropout', 'dropatt')
SAMPLING_ONLY = ('prompt', 'sample_len', 'temperature', 'top_k')


def check_together(model_cfg, train_cfg, given):
    """The rules that tie fields of both configs, or the flags given, together. A flag given on
    the command line that this arch or mode ignores is refused (a preset's values never are)."""
    if train_cfg.task in data.LM_TASKS and model_cfg.bptt_depth < 0:
        raise ValueError('LM streams need --bptt_depth >= 0 (segments per step - 1)')
    arch = model_cfg.arch
    if 'mem_len' in given and arch not in ('xl', 'xl_rmt'):
        raise ValueError(f'--mem_len sets the XL cache, which --arch {arch} does not have: drop '
                         'it (or use --arch xl or xl_rmt)')
    if 'n_mem_tokens' in given and arch in ('baseline', 'xl'):
        raise ValueError(f'--n_mem_tokens sets memory tokens, which --arch {arch} does not have: '
                         'drop it (or use --arch mt, rmt or xl_rmt)')
    # flags that only some tasks or settings read: name -> (read here?, who reads it)
    task = train_cfg.task
    used_by = dict(seq_len=(task in ('copy', 'reverse'), '--task copy and reverse'),
                   eval_examples=(task in data.ALGO_TASKS, 'algorithmic tasks'),
                   stop_exact=(task in data.ALGO_TASKS, 'algorithmic tasks'),
                   eval_tokens=(task in data.LM_TASKS, 'language-modelling tasks'),
                   reset_memory=(task in data.LM_TASKS, 'language-modelling tasks'),
                   data_path=(task == 'text', '--task text'),
                   data_dir=(task in data.LM_TASKS, 'language-modelling tasks'),
                   warmup_iters=(train_cfg.schedule == 'cosine', '--schedule cosine'),
                   top_k=(train_cfg.temperature > 0, 'sampling at --temperature > 0'))
    unused = [(k, who) for k, (used, who) in used_by.items() if k in given and not used]
    if unused:
        raise ValueError(f'--{unused[0][0]} is read by {unused[0][1]} only, and does nothing '
                         'here: drop it')
    ignored = [k for k in given if k in TRAINING_ONLY]
    if train_cfg.mode == 'train':
        ignored = [k for k in given if k in SAMPLING_ONLY]
    elif train_cfg.mode == 'eval':
        ignored += [k for k in given if k in SAMPLING_ONLY]
    if ignored:
        raise ValueError(f'--{ignored[0]} does nothing in --mode {train_cfg.mode}: drop it')
    if train_cfg.keep_every % train_cfg.eval_interval:
        raise ValueError(f'--keep_every {train_cfg.keep_every} keeps validation checkpoints: '
                         f'make it a multiple of --eval_interval {train_cfg.eval_interval}')
    if train_cfg.task in data.ALGO_TASKS and {'prompt', 'sample_len'} & given.keys():
        raise ValueError('--prompt and --sample_len are for language-modelling tasks; --mode '
                         'sample on an algorithmic task shows test examples: drop them')


# ----------------------------------------------------------------------------- device, DDP
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


def devices():  # the --device values this machine has
    n_gpu = torch.cuda.device_count()
    return ['auto', 'cpu'] + ['cuda'] * (n_gpu > 0) + [f'cuda:{i}' for i in range(n_gpu)]


def choose_device(name):
    """--device -> the device to run on ('auto': the GPU if there is one, else the CPU); a name
    this machine lacks ends in one line. train.py and trams.py choose here."""
    if name not in devices():
        die(f"unknown device '{name}': use one of {', '.join(devices())}")
    if name == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    return name


def setup(train_cfg):
    """-> Env: the device and, under torchrun (the RANK variable), the process group; the autocast
    dtype; the seed of this rank."""
    ddp = 'RANK' in os.environ
    rank, world = int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))
    device = choose_device(train_cfg.device)
    gpu = device.startswith('cuda')
    if ddp and gpu:                              # torchrun: one process per GPU ...
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
        dist.init_process_group('nccl')
    elif ddp:                                    # ... or per share of the CPU
        dist.init_process_group('gloo')
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # fp32 on GPU
    # --dtype auto: bf16 on CUDA with bf16, or on a CPU with AMX or AVX512-BF16, else float32
    name, fast = train_cfg.dtype, False
    if name == 'auto' and gpu:
        fast = torch.cuda.is_bf16_supported()
    elif name == 'auto' and os.path.exists('/proc/cpuinfo'):
        fast = any(f in open('/proc/cpuinfo').read() for f in ('amx_bf16', 'avx512_bf16'))
    if name == 'auto':
        name = 'bfloat16' if fast else 'float32'
    dtype, kind = getattr(torch, name), device.split(':')[0]
    torch.manual_seed(train_cfg.seed + rank)     # dropout differs per rank; init is broadcast
    return Env(device, rank, world, ddp, dtype,
               autocast=torch.autocast(kind, dtype, enabled=dtype != torch.float32),
               scaler=torch.amp.GradScaler(kind, enabled=dtype == torch.float16),
               master=rank == 0, cuda=gpu)


def wrap(model, model_cfg, train_cfg, dataset, env):
    """The model as the training step calls it: compiled per segment (--compile), and under
    torchrun in DDP, whose gradient all-reduce overlaps the backward pass."""
    if train_cfg.compile:  # each segment is one graph; shapes settle after the first segments
        model.segment = torch.compile(model.segment)
    if not env.ddp:
        return model
    # no buffers to broadcast: memory is passed in and out of forward; on LM streams the initial
    # RMT memory is unused after the first step (the carried memory replaces it)
    return DDP(model, device_ids=[env.device] if env.cuda else None,
               find_unused_parameters=model_cfg.n_mem_tokens > 0 and dataset.spec is None)


def describe(env):
    """torch's version, the device (GPU or CPU model), threads and autocast dtype: what makes runs
    on different machines comparable."""
    name = 'CPU'
    if env.cuda:
        name = torch.cuda.get_device_name(env.device)
    elif os.path.exists('/proc/cpuinfo'):
        models = re.findall(r'model name\s*:\s*(.*)', open('/proc/cpuinfo').read())
        name = models[0].strip() if models else name
    return (f'torch {torch.__version__} | {env.device} {name} | {torch.get_num_threads()} threads'
            f' | {str(env.dtype).removeprefix("torch.")}')


def peak_memory(device):  # MB: the CUDA allocator's peak, or the process's resident high-water mark
    if str(device).startswith('cuda'):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reduce(vals, env):  # sum over ranks: sums, never means of means
    t = torch.tensor(vals, dtype=torch.float64, device=env.device)
    if env.ddp:
        dist.all_reduce(t)
    return t.tolist()


def to_device(t, env):  # pinned on CUDA: the copy overlaps compute
    if env.cuda:
        t = t.pin_memory()
    return t.to(env.device, non_blocking=True)


class Log:
    """What a training run reports: on rank 0, a line per --log_interval steps, per validation
    and for the test, each also appended as one JSON object to out_dir/metrics.jsonl (plot it
    with anything). A step line's speed covers exactly the steps since the previous step line;
    time spent validating and writing checkpoints is left out (exclude)."""

    def __init__(self, model, env, out_dir, start):
        self.model, self.env, self.path = model, env, None
        if env.master:
            self.path = os.path.join(out_dir, 'metrics.jsonl')
            keep_metrics(self.path, start)
        self.restart()

    def restart(self):
        self.t0, self.steps, self.tokens, self.seen = time.time(), 0, 0, 0

    def count(self, tokens, seen):  # one step: tokens trained (scored), tokens seen (for MFU)
        self.steps, self.tokens, self.seen = self.steps + 1, self.tokens + tokens, self.seen + seen

    def exclude(self, seconds):
        self.t0 += seconds

    def step(self, step, loss, gnorm, lr):
        """The step line: loss, lr, grad norm, ms/step, tokens/s over all ranks, model FLOP/s
        (MFU on a known GPU), peak memory; then the count starts anew."""
        dt = max(time.time() - self.t0, 1e-9)
        if self.env.master:
            speed = dict(ms_per_step=1000 * dt / max(self.steps, 1),
                         tok_per_s=self.tokens * self.env.world / dt,
                         tflop_per_s=self.model.flops_per_token(True) * self.seen / dt / 1e12,
                         peak_mb=peak_memory(self.env.device))
            rec = dict(step=step, loss=loss.item(), lr=lr, gnorm=gnorm.item(), **speed)
            print(f"step {step} | loss {rec['loss']:.4f} | lr {lr:.2e} | gnorm {rec['gnorm']:.2f}"
                  f" | {speed['ms_per_step']:.0f} ms/step | {speed['tok_per_s']:.0f} tok/s | "
                  f"{self.model.mfu(self.seen / dt, True, self.env.dtype)} | "
                  f"peak {speed['peak_mb']:.0f} MB", flush=True)
            self.write(dict(kind='train', **rec))
        self.restart()

    def result(self, title, res, step, seconds=None):
        """A validation line ('val step N: ..., seconds') or the test line ('test: ...')."""
        line = f'{title}: {format_metrics(res)}'
        if seconds is not None:
            line += f' | {seconds:.1f} s'
        self.env.print(line, flush=True)
        self.write(dict(kind=title.split()[0], step=step, **res, seconds=seconds))

    def write(self, rec):
        if self.path is not None:
            with open(self.path, 'a') as f:
                f.write(json.dumps(rec) + '\n')


def keep_metrics(path, start):
    """Before a run appends to metrics.jsonl: a new run (start 0) starts it anew; a resumed one
    keeps the lines up to its checkpoint's step, dropping later ones and a torn last line, so
    that no step appears twice. Rewritten atomically."""
    kept = []
    if start and os.path.exists(path):
        for line in open(path, errors='replace').read().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:                   # torn by a kill in mid-write
                continue
            # the test is run anew at the end: its record too
            if isinstance(rec, dict) and rec.get('kind') != 'test' and \
                    isinstance(rec.get('step'), int) and rec['step'] <= start:
                kept.append(line + '\n')
    with open(f'{path}.tmp', 'w') as f:
        f.writelines(kept)
    os.replace(f'{path}.tmp', path)


# ----------------------------------------------------------------------------- data checks
def load_data(train_cfg, model_cfg, env):
    """The task's splits for this rank (data.load); sets the model's vocabulary from them. One
    step holds batch_size * grad_accum examples (or LM streams) per rank, split into grad_accum
    chunks in train_step (Transformer-XL's batch_chunk); an LM step trains on bptt_depth + 1
    segments of each stream."""
    if env.ddp and not env.master:
        dist.barrier()                           # rank 0 prepares the LM files, the others wait
    try:
        dataset = data.load(train_cfg.task, train_cfg.seq_len, train_cfg.seed, train_cfg.data_dir,
                            train_cfg.data_path or None,
                            rows=train_cfg.batch_size * train_cfg.grad_accum,
                            window=model_cfg.seg_len * (model_cfg.bptt_depth + 1), rank=env.rank,
                            world=env.world)
    except data.DataError as e:
        die(str(e))
    if env.ddp and env.master:
        dist.barrier()
    model_cfg.vocab_size, model_cfg.cutoffs = dataset.vocab_size, dataset.cutoffs
    if dataset.spec is not None:
        env.print('data:', ', '.join(f'{s} {len(dataset.loaders[s].seqs)} ({c})'
                                     for s, c in dataset.checksums.items()))
    if train_cfg.mode == 'sample' and dataset.corpus is not None:
        try:
            dataset.corpus.encode(train_cfg.prompt)
        except data.DataError as e:
            die(f'--prompt: {e}')
    return dataset


def check_same_data(ckpt, path, dataset, train_cfg, given):
    """--mode eval or sample reads the data the checkpoint was trained on (a resumed run checks
    them in restore): refuse data whose digest changed since, unless a flag chose other data."""
    chose = {'data_path', 'data_dir', 'seed', 'seq_len', 'task'} & given.keys()
    if train_cfg.mode == 'train' or ckpt is None or 'data' not in ckpt or chose:
        return
    changed = [s for s, c in dataset.checksums.items() if ckpt['data'].get(s, c) != c]
    if changed:
        die(f"the {train_cfg.task} data ({train_cfg.data_path or train_cfg.data_dir}) changed "
            f"since {path} was trained on them ({', '.join(changed)} split digests differ): "
            'restore them, or give --data_path (or --data_dir) to use the data as they are now')


def check_fits(model_cfg, train_cfg, dataset, env):
    """Refuse a step that plainly cannot fit, before anything is allocated. A lower bound: the
    weights (training: with their gradients and Adam's two moments, 16 bytes each), and per layer
    and segment, the attention probabilities (B, H, S, K), the FFN's hidden layer (B, S, d_inner)
    and a few (B, S, d_model) activations at 4 bytes each (autograd keeps about 9 bytes per
    probability in bf16, 18 in fp32); training keeps them for every segment of a step (an LM
    window, or a whole example), evaluation for one layer of one segment at a time. What the
    process may use: the machine's memory, or less where a cgroup or ulimit says so."""
    cfg, S = model_cfg, model_cfg.seg_len + 2 * model_cfg.n_mem_tokens  # RMT: read, write slots
    held = cfg.n_layer * (cfg.bptt_depth + 1)                 # an LM step: k+1 segments
    if dataset.spec is not None:
        held = cfg.n_layer * dataset.loaders['train'].seqs.shape[1] / cfg.seg_len
    if cfg.grad_checkpoint:                                   # one segment at a time
        held = cfg.n_layer
    weights = cfg.n_layer * cfg.d_model * (4 * cfg.n_head * cfg.d_head + 2 * cfg.d_inner)
    weights, per_weight = weights + dataset.vocab_size * cfg.d_model, 16
    if train_cfg.mode != 'train':
        held, per_weight = 1, 4
    per_query = cfg.n_head * (cfg.mem_len + S) + cfg.d_inner + 4 * cfg.d_model
    need = 4 * held * train_cfg.batch_size * S * per_query + per_weight * weights
    have, where = usable_memory(), 'this machine lets this process use'
    if env.cuda:
        have, where = torch.cuda.get_device_properties(env.device).total_memory, 'this GPU has'
    if need > have:
        die(f'one step would need over {need / 2**30:.1f} GiB for weights and activations, and '
            f'{where} {have / 2**30:.1f} GiB: lower --batch_size, --seg_len, --mem_len or the '
            'model size')


def usable_memory():  # bytes: physical memory, capped by a cgroup (v2 or v1) or RLIMIT_AS limit
    limits = [os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')]
    for path in ('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory/memory.limit_in_bytes'):
        if os.path.exists(path):
            text = open(path).read().strip()
            if text.isdigit():
                limits.append(int(text))
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY:
        limits.append(soft)
    return min(limits)


# ---------------------------------------------------------------------------- checkpoints, restarts
# Checkpoints and restarts: what a training run writes so that it continues exactly, and where a
# starting process begins. Only rank 0 writes, into out_dir:
#   ckpt.pt  the latest state: weights, optimizer, schedule, step, configs, the flags that made the
#            run, every rank's RNG and LM memory, the stream position, the data's digests
#   best.pt  the same, at the best validation loss
#   ckpt_STEP.pt  with --keep_every: the same, kept at that step (a learning curve's points)
#   lock     locked by rank 0 while it trains; the operating system releases it when the process
#            ends, however it ends
# --resume auto (the default) continues ckpt.pt when the same flags made it, which is what a
# torchrun restart does (it reruns the same command); --resume true continues it with new loop
# knobs (RESUMABLE); --resume false starts anew. A problem ends in one line (exit 2).

# what a resumed run may change: the loop's knobs, never the model, the data or the streams
RESUMABLE = ('mode', 'lr', 'warmup_iters', 'grad_clip', 'max_iters', 'eval_interval',
             'eval_examples', 'stop_exact', 'eval_tokens', 'reset_memory', 'keep_every',
             'log_interval', 'device', 'dtype', 'compile', 'out_dir', 'resume', 'skip_nonfinite',
             'dropout', 'dropatt', 'prompt', 'sample_len', 'temperature', 'top_k')


def load_checkpoint(path, resume=False):
    """The checkpoint dict at path (on the CPU), checked before anything heavy: its digest (a
    checkpoint without one, from before digests, loads with a note), its entries, finite weights;
    resume: it must hold a whole training state. Each problem ends in one line naming the file."""
    if os.path.exists(path) and not os.path.isfile(path):
        die(f'{path} is not a file: move it away, or give another path')
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
    stored = ckpt.pop('digest', None)
    if stored is not None and stored != digest(ckpt):
        die(f'{path} is damaged: its contents do not match the digest written with them; '
            f'{other_copy(path)}')
    for key in ('model', 'model_cfg', 'train_cfg'):
        if not isinstance(ckpt[key], dict):
            die(f"{path} is malformed: '{key}' is a {type(ckpt[key]).__name__}, not a dict: "
                'use another checkpoint')
    bad = [k for k, v in ckpt['model'].items()
           if not torch.is_tensor(v) or (v.is_floating_point() and not v.isfinite().all())]
    if bad:
        die(f'{path} holds non-finite or malformed weights ({bad[0]}, {len(bad)} in all): '
            f'{other_copy(path)}')
    lacks = {'optimizer', 'scheduler', 'step', 'best_val', 'ranks', 'data', 'loader'} - ckpt.keys()
    if resume and lacks:
        die(f"{path} holds no complete training state (no "
            f"{', '.join(sorted(lacks))}): start a new run with --resume false "
            'or another --out_dir')
    if resume and not (isinstance(ckpt['step'], int) and ckpt['step'] >= 0):
        die(f"{path} is malformed: its step is {ckpt['step']!r}: {other_copy(path)}")
    if stored is None:
        print(f'note: {path} holds no digest (written before digests): loaded unverified')
    return ckpt


def digest(obj):
    """SHA-256 of everything a checkpoint holds (tensors by dtype, shape and bytes, other values
    by repr), in a fixed order: written with the checkpoint and checked on every load, so that a
    changed byte anywhere (a weight, an optimizer moment, a step count) is found."""
    h = hashlib.sha256()

    def visit(x):
        if isinstance(x, dict):
            h.update(b'{')
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                visit(x[k])
            h.update(b'}')
        elif isinstance(x, (list, tuple)):
            h.update(b'[')
            for v in x:
                visit(v)
            h.update(b']')
        elif torch.is_tensor(x):
            h.update(f'{x.dtype}{tuple(x.shape)}'.encode())
            h.update(x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(x).encode())
    visit(obj)
    return h.hexdigest()


def other_copy(path):  # the fix for a damaged checkpoint: its sibling, if it is there
    folder, name = os.path.split(path)
    for other in ('ckpt.pt', 'best.pt'):
        if other != name and os.path.exists(os.path.join(folder, other)):
            return (f'{os.path.join(folder, other)} is another copy of the run (use it as '
                    '--init_from, or move it to ckpt.pt and resume with --resume true)')
    return 'use another checkpoint (a training run: or start anew with --resume false)'


def load_weights(model, ckpt, path):
    try:
        model.load_state_dict(ckpt['model'])
    except RuntimeError:
        die(f'{path} does not fit this model (other size or vocabulary): '
            'give the matching flags or another checkpoint')


def run_flags(given, ckpt=None, resuming=False):
    """The flags that make a run what it is (stored with it, for --resume auto): not where it
    lives, nor how it starts; a resumed run adds its own to those that made it."""
    flags = {k: v for k, v in given.items() if k not in ('resume', 'out_dir')}
    if resuming:
        flags = {**ckpt.get('flags', {}), **flags}
    return flags


def choose_start(given, out_dir):
    """-> (checkpoint or None, its path, resuming?). Training continues out_dir's ckpt.pt with
    --resume true, and with auto when the same flags made that run; auto starts anew when out_dir
    holds no run and refuses when it holds another, so nothing is replaced without --resume false.
    A new run, --mode eval or --mode sample starts from the weights of --init_from, if given."""
    how, init = given.get('resume', 'auto'), given.get('init_from', '')
    mode = given.get('mode', 'train')
    if how not in ('auto', 'true', 'false'):
        die(f"--resume takes auto, true or false, not '{how}'")
    last = os.path.join(out_dir, 'ckpt.pt')
    if how == 'true' and init:
        die('--resume continues the run in --out_dir, --init_from starts a new one: give one')
    if mode in ('eval', 'sample') and not init and how != 'true':
        die(f'--mode {mode} reads a checkpoint: give --init_from PATH (for example {last})')
    if how == 'true':
        run = load_checkpoint(last, resume=True)
        settings = {**run['train_cfg'], **run['model_cfg']}
        for k, v in given.items():
            if k not in RESUMABLE and v != settings.get(k, v):
                die(f'--{k} cannot change when a run resumes ({last} has '
                    f'{settings[k]!r}): drop the flag, or start a new run with '
                    '--resume false or another --out_dir')
        return run, last, True
    if mode == 'train' and how == 'auto' and os.path.exists(last):
        run = load_checkpoint(last, resume=True)
        flags, theirs = run_flags(given), run.get('flags', {})
        diff = sorted(k for k in flags.keys() | theirs.keys() if flags.get(k) != theirs.get(k))
        if diff or 'flags' not in run:
            fixes = 'continue it with --resume true, replace it'
            if any(k not in RESUMABLE for k in diff):    # a resumed run could not change those
                fixes = 'replace it'
            die(f"{last} holds a run made with other flags ({', '.join(diff) or 'unknown'}): "
                f'{fixes} with --resume false, or give another --out_dir')
        return run, last, True
    if init:
        return load_checkpoint(init), init, False
    return None, '', False


def restore(ckpt, path, given, optimizer, scheduler, dataset, train_cfg, env):
    """Training state of a checkpoint, for this rank -> (step, best val loss, LM memory). The
    weights are loaded by the caller, as for --init_from."""
    if len(ckpt['ranks']) != env.world:
        die(f"{path} was written by {len(ckpt['ranks'])} processes: resume with as many")
    if ckpt['data'] != dataset.checksums:        # older versions stored only LM split lengths
        die(f'the data differ from those {path} was trained on (another file '
            'or other contents): restore them, or start a new run with '
            '--resume false or another --out_dir')
    try:
        mine = ckpt['ranks'][env.rank]
        optimizer.load_state_dict(ckpt['optimizer'])
        scheduler.load_state_dict(ckpt['scheduler'])
        dataset.loaders['train'].load_state_dict(ckpt['loader'])
        states = [memory.move_state(s, env.device) for s in mine['memory']]
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        die(f'{path} holds a malformed training state ({type(e).__name__}): {other_copy(path)}')
    if 'lr' in given:                            # a new --lr wins over the checkpoint's
        optimizer.param_groups[0]['lr'], scheduler.base_lrs = train_cfg.lr, [train_cfg.lr]
    torch.set_rng_state(mine['rng'])
    if env.cuda and mine['cuda_rng'] is not None:
        torch.cuda.set_rng_state(mine['cuda_rng'])
    env.print(f"resuming {path} at step {ckpt['step']} of {train_cfg.max_iters}")
    if ckpt.get('solved') and train_cfg.stop_exact > 0:   # it ended there: the test is left
        env.print(f"it was solved at step {ckpt['step']}, so only the test is left "
                  '(--resume true --stop_exact 0 trains on)')
        train_cfg.max_iters = ckpt['step']
    return ckpt['step'], ckpt['best_val'], states


def save_checkpoint(name, step, best_val, states, flags, model, optimizer, scheduler, model_cfg,
                    train_cfg, dataset, env, solved=False):
    """All it takes to continue exactly. Every rank sends its RNG and memory, rank 0 writes:
    temp file, fsync, rename, so that a crash never leaves a torn checkpoint. solved: the run
    ended here, its validation at --stop_exact (a resume goes straight to the test)."""
    mine = dict(rng=torch.get_rng_state(), memory=[], cuda_rng=None)
    if env.cuda:
        mine['cuda_rng'] = torch.cuda.get_rng_state()
    for s in states:                             # plain tuples: weights_only reads no namedtuple
        mine['memory'].append(None if s is None else tuple(memory.move_state(s, 'cpu')))
    ranks = [mine] * env.world
    if env.ddp:
        dist.all_gather_object(ranks, mine)
    if not env.master:
        return
    dest = os.path.join(train_cfg.out_dir, name)
    tmp = f'{dest}.tmp{os.getpid()}'
    ckpt = dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(), model_cfg=asdict(model_cfg),
                train_cfg=asdict(train_cfg), step=step, best_val=best_val, ranks=ranks,
                data=dataset.checksums, loader=dataset.loaders['train'].state_dict(), flags=flags,
                solved=solved)
    ckpt['digest'] = digest(ckpt)
    try:
        with open(tmp, 'wb') as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        # read back before it replaces the previous checkpoint: that one stays until this verifies
        written = torch.load(tmp, map_location='cpu', weights_only=True)
        if written.pop('digest', None) != digest(written):
            raise OSError(f'{tmp} read back differs from what was written')
        os.replace(tmp, dest)
    except (OSError, RuntimeError) as e:         # torch.save reports a full disk as RuntimeError
        if os.path.exists(tmp):
            os.remove(tmp)
        kept = 'no earlier checkpoint of this name exists'
        if os.path.isfile(dest):
            kept = f'the previous one in {dest} is intact (--resume true continues from it)'
        die(f'could not write {dest} ({type(e).__name__}: '
            f'{str(e).splitlines()[0][:80]}): free disk space or change --out_dir; {kept}')


def evaluate_checkpoint(model, dataset, train_cfg, env):
    """--mode eval: a checkpoint on val and test, with the protocol it was evaluated under (the
    flags --seg_len, --mem_len, --clamp_len and --reset_memory may change it)."""
    cfg = model.cfg
    reset = ' | memory reset every segment' if train_cfg.reset_memory else ''
    env.print(f'eval: arch {cfg.arch} | seg_len {cfg.seg_len} | mem_len {cfg.mem_len} | '
              f'n_mem_tokens {cfg.n_mem_tokens} | clamp_len {cfg.clamp_len}{reset}')
    for split in ('val', 'test'):
        res = evaluate(model, split, dataset, train_cfg, env)   # every rank evaluates its share
        env.print(f'{split}: {format_metrics(res)}')


# ----------------------------------------------------------------------------- lock, rank agreement
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
    for name in ('ckpt.pt', 'best.pt', 'metrics.jsonl'):
        if os.path.exists(os.path.join(out_dir, name)):
            if not os.path.isfile(os.path.join(out_dir, name)):
                die(f'{os.path.join(out_dir, name)} is not a file: move it away, or give '
                    'another --out_dir')
    for name in os.listdir(out_dir):
        if '.pt.tmp' in name and os.path.isfile(os.path.join(out_dir, name)):
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


# ----------------------------------------------------------------------------- non-finite steps
def count_nonfinite(step, skipped, train_cfg, env):
    """A step whose gradient was not finite made no update (the same on every rank: gradients
    are reduced). -> the number of such steps so far; past --skip_nonfinite, the run stops with
    one line naming the last good checkpoint (exit 1). fp16: an overflow at a loss scale above 1
    may be the scale's fault (the scaler halved it): not counted; one at scale 1 or below is the
    model's."""
    if not env.scaler.is_enabled() or env.scaler.get_scale() < 1:
        skipped += 1
    if skipped > train_cfg.skip_nonfinite:       # name a checkpoint only if one exists
        last = os.path.join(train_cfg.out_dir, 'ckpt.pt')
        fix = f'the last good checkpoint is {last}: resume it with --resume true'
        if not os.path.exists(last):
            fix = 'no checkpoint was written yet: start over'
        die(f'non-finite loss or gradient at step {step}; {fix}, perhaps with a lower '
            '--lr, or allow --skip_nonfinite N', code=1)
    return skipped


# ----------------------------------------------------------------------------- signals, exit
def catch_signals(handler):  # route SIGINT (Ctrl-C) and SIGTERM to handler
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)


class Signals(list):
    """SIGINT and SIGTERM during training, recorded: the loop stops after the current step and
    its checkpoint (stop_on_signal). A validation, which may take minutes on a whole split, is
    abandoned at once instead of finished (`abandoning`), in one process; under torchrun the
    ranks finish it, since their collectives must stay in step."""

    def __init__(self, env):
        super().__init__()
        self.env, self.validating = env, False
        catch_signals(self.record)

    def record(self, signum, frame):
        self.append(signum)
        if self.validating:
            raise KeyboardInterrupt              # leave the validation where it is

    @contextmanager
    def abandoning(self, step, best_val, states, to_save):
        """Around a validation: a signal abandons it and stops the run at step."""
        self.validating = not self.env.ddp
        try:
            if self and self.validating:         # a signal came as it was about to start
                raise KeyboardInterrupt
            yield
        except KeyboardInterrupt:
            self.validating = False              # a second signal must not cut the checkpoint
            stop_on_signal(self, step, best_val, states, to_save, 'validation abandoned')
        self.validating = False


def stop_on_signal(signals, step, best_val, states, to_save, why='after the step'):
    """A signal on any rank: every rank stops at this step, after one checkpoint, and exits with
    128 + the signal; the same command continues the run."""
    stop = len(signals)
    env = to_save[-1]
    if env.ddp:
        stop = reduce([stop], env)[0]
    if stop:
        save_checkpoint('ckpt.pt', step, best_val, states, *to_save)
        env.print(f'stopped by a signal at step {step} ({why}): the same command continues '
                  'the run', flush=True)
        leave(128 + (signals[0] if signals else signal.SIGTERM))


def stop_at_once(signum, frame):
    """Ctrl-C or SIGTERM outside the training loop (start-up, data preparation, --mode eval and
    sample, trams.py): nothing is half-written there, so the process ends at once, in one line."""
    sys.stdout.flush()
    print(f'error: stopped by {signal.Signals(signum).name}', file=sys.stderr, flush=True)
    os._exit(128 + signum)


def stop_final_test(signum, frame):
    die('stopped by a signal in the final test; every checkpoint is written: `--mode eval '
        '--init_from OUT_DIR/ckpt.pt` runs the test', code=128 + signum)


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


if __name__ == '__main__':
    catch_signals(stop_at_once)  # until the training loop takes them over
    main(sys.argv[1:])
    if dist.is_initialized():    # every rank is done with every collective before any leaves
        dist.barrier()
    leave(0)
