"""What pretrain.py, finetune.py and probe.py share. Checkpoints hold only tensors and plain
values: weights_only=True loads them.

    d = training.setup_distributed('cpu')  # Dist(rank, local_rank, world_size, device, is_main)
    backbone, report = training.load_backbone('runs/pretrain_mapet/backbone.pt', num_classes=10)
"""
import contextlib
import json
import math
import os
import random
import resource
import subprocess
import time
from collections import namedtuple

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import data
import model

# Processes: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; plain `python` is one.

Dist = namedtuple('Dist', 'rank local_rank world_size device is_main')


def setup_distributed(device=None):
    """Join torchrun's group (NCCL on GPUs, gloo on CPUs) or run alone."""
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if 'RANK' not in os.environ:
        return Dist(0, 0, 1, device, True)
    rank, local_rank = int(os.environ['RANK']), int(os.environ['LOCAL_RANK'])
    if device.type == 'cuda':
        device = torch.device('cuda', local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)  # before init, so NCCL binds each rank to its own GPU
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return Dist(rank, local_rank, dist.get_world_size(), device, rank == 0)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def run_command(script, parser, resolve_args, run, argv=None):
    """A stage's main(): a bad flag ends it in one line."""
    try:
        args = resolve_args(parser.parse_args(argv))
        if args.device is not None:
            check_device(args.device)
        world, accum = int(os.environ.get('WORLD_SIZE', 1)), getattr(args, 'accum', None)
        if accum and args.batch_size % (world * accum):
            raise ValueError(f'--batch-size {args.batch_size} is not divisible by {world} processes'
                             f' x --accum {accum}: use a multiple of {world * accum}')
    except ValueError as e:
        raise SystemExit(f'{script}: {e}') from None
    d = setup_distributed(args.device)
    try:
        return run(args, d)
    finally:
        cleanup_distributed()


def check_device(name):
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f'--device {name} is not a device: use cuda, cpu or cuda:N') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device {name}: no GPU is visible; pass --device cpu')


def check_args(args, positive=(), ranges=()):
    for key in positive:
        value = getattr(args, key)
        if value is not None and not value > 0:
            raise ValueError(f'--{key.replace("_", "-")} must be positive, got {value}')
    for key, low, high in ranges:
        value = getattr(args, key)
        if value is not None and not low <= value <= high:
            within = 'must not be negative' if high == math.inf else f'must be in [{low}, {high}]'
            raise ValueError(f'--{key.replace("_", "-")} {within}, got {value}')


def default_workers():
    """The paper's 10 loader processes, or fewer CPUs."""
    return min(10, len(os.sched_getaffinity(0)))


def is_main():
    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get('RANK', 0))) == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs)


def seed_everything(seed, rank):
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


# Optimisation: the schedule (Tab. 7-8), parameter groups, mixed precision.

def lr_at(step, total_steps, warmup_steps, peak_lr, min_lr, warmup_lr):
    """Linear warmup, then cosine decay, per step (Tab. 7)."""
    if step < warmup_steps:
        return warmup_lr + (peak_lr - warmup_lr) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# A run stops at `last` (--steps) of `total`; `micro`: images per process per pass.
Schedule = namedtuple('Schedule', 'steps_per_epoch total warmup last micro peak_lr min_lr '
                                  'warmup_lr')


def set_lr(optimizer, s, step):
    lr = lr_at(step, s.total, s.warmup, s.peak_lr, s.min_lr, s.warmup_lr)
    for group in optimizer.param_groups:
        group['lr'] = lr * group['lr_scale']
    return lr


def plan(args, num_images, d, reference_batch, warmup_lr):
    """The Schedule, lr scaled linearly from reference_batch (BEiT / MAE), and its line."""
    spe = num_images // args.batch_size
    total, micro = args.epochs * spe, args.batch_size // (d.world_size * args.accum)
    s = Schedule(spe, total, round(args.warmup_epochs * spe), min(total, args.steps or total),
                 micro, args.lr * args.batch_size / reference_batch, args.min_lr, warmup_lr)
    return s, (f'batch {args.batch_size} = {d.world_size} process(es) x {args.accum} accum x '
               f'{micro}; lr {args.lr:g} x {args.batch_size}/{reference_batch} = {s.peak_lr:.3g}; '
               f'{spe} steps/epoch, {total} steps in all, {s.warmup} warmup')


def param_groups(module, weight_decay, lr_scale=None):
    """AdamW groups of the trainable tensors, no weight decay on 1-D ones (biases, norms, layer
    scale) or position / CLS / mask tokens (Tab. 7); `lr_scale(name)`: a per-tensor factor."""
    groups = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.split('.')[-1] in ('pos_embed', 'cls_token', 'mask_token')
        scale = float(lr_scale(name)) if lr_scale else 1.0
        group = groups.setdefault((no_decay, scale), dict(
            params=[], weight_decay=0.0 if no_decay else weight_decay, lr_scale=scale))
        group['params'].append(p)
    return list(groups.values())


DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float32': torch.float32}


def resolve_dtype(name, device):
    """'auto': bf16 on Ampere+ GPUs, fp16 on older ones (the paper's V100s), fp32 on CPUs."""
    if name == 'auto':
        if device.type != 'cuda':
            return torch.float32
        # Not torch.cuda.is_bf16_supported(): it says yes for a V100, where bf16 is emulated.
        ampere = torch.cuda.get_device_capability(device) >= (8, 0)
        return torch.bfloat16 if ampere else torch.float16
    return DTYPES[name]


def autocast(dtype, device):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def grad_scaler(dtype, device):
    """Only fp16 needs one: bf16 has fp32's exponent range."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


# Training-loop steps, shared by the stages that train.

def wrap_ddp(module, d):
    if d.world_size == 1:
        return None
    ids = [d.local_rank] if d.device.type == 'cuda' else None
    return DistributedDataParallel(module, device_ids=ids)


def train_loader(dataset, d, seed, s, accum, workers):
    """Its own generator spares the process's stream."""
    sampler = data.EpochSampler(dataset, d.world_size, d.rank, seed,
                                per_epoch=s.steps_per_epoch * accum * s.micro)
    return DataLoader(dataset, batch_size=s.micro, sampler=sampler, num_workers=workers,
                      collate_fn=data.collate_skip, pin_memory=d.device.type == 'cuda',
                      persistent_workers=workers > 0, drop_last=True, generator=torch.Generator())


def steps(loader, start, s, accum, ddp, script):
    """(step, its `accum` micro-batches) up to s.last; a resumed run skips what it took."""
    for epoch in range(start // s.steps_per_epoch, -(-s.last // s.steps_per_epoch)):
        first = max(start, epoch * s.steps_per_epoch)
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip = (first - epoch * s.steps_per_epoch) * accum * s.micro
        batches = iter(loader)
        for step in range(first, min(s.last, (epoch + 1) * s.steps_per_epoch)):
            yield step, micro_batches(batches, accum, ddp, script, step)


def micro_batches(batches, accum, ddp, script, step):
    """`accum` batches, all but the last under no_sync: one gradient all-reduce a step."""
    for k in range(accum):
        batch = next(batches)
        if batch is None:
            raise SystemExit(f'{script}: every image of a batch at step {step + 1} is unreadable')
        with ddp.no_sync() if ddp is not None and k < accum - 1 else contextlib.nullcontext():
            yield batch


def finish_step(stats, optimizer, scaler, clip_grad, step, script, ckpt_path):
    """Sum `stats` (loss sum, micro-batches, ...) over ranks: a non-finite loss stops all ranks
    before the weights change. (loss, sums, grad norm, overflow)."""
    if dist.is_initialized():
        dist.all_reduce(stats)
    sums = stats.tolist()
    loss = sums[0] / sums[1]
    if not math.isfinite(loss):
        last = (f'; --resume continues the last good checkpoint, {ckpt_path}'
                if os.path.exists(ckpt_path) else '')
        raise SystemExit(f'{script}: non-finite loss ({loss}) at step {step + 1}: lower --lr, '
                         f'lengthen --warmup-epochs or use --dtype bfloat16/float32{last}')
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group['params']]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad or math.inf)
    scale = scaler.get_scale()
    scaler.step(optimizer)  # float16: skipped if the gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss, sums, float(grad_norm), scaler.is_enabled() and scaler.get_scale() < scale


class Meter:
    """Means of per-step numbers since the last read()."""

    def __init__(self):
        self.rows, self.start = [], time.time()

    def add(self, **values):
        self.rows.append(values)

    def read(self):
        now, rows = time.time(), self.rows
        self.rows, self.start, seconds = [], now, now - self.start
        return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}, len(rows), seconds


def peak_memory_mb(device):
    if device.type == 'cuda':
        return round(torch.cuda.max_memory_allocated(device) / 2 ** 20)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


# Files: checkpoints, the JSON-lines log, args.json.

def save_checkpoint(path, obj):
    """Atomic: a kill during the write keeps the previous file."""
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise ValueError(f'no checkpoint file {path}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch's message advises the unsafe weights_only=False
        raise ValueError(f'{path} is not a readable checkpoint of this project ({type(e).__name__}'
                         '): damaged or another kind of file; pass a ckpt.pt or backbone.pt of '
                         'pretrain.py or finetune.py') from None


def resume_or_start(args, path, same):
    """--resume: the ckpt.pt at `path` if its `same` flags agree; else None, never overwriting."""
    if not args.resume:
        if os.path.exists(path):
            raise ValueError(f'{path} exists: pass --resume to continue it, or another --out')
        return None
    ckpt = load_checkpoint(path)
    was = ckpt['args']
    for flag in same:
        if was[flag] != getattr(args, flag):
            f = '--' + flag.replace('_', '-')
            raise ValueError(f'{path} is a run with {f} {was[flag]}; this run asks for {f} '
                             f'{getattr(args, flag)}: pass {f} {was[flag]} to continue it, or '
                             'another --out')
    changed = [f'--{k.replace("_", "-")} {getattr(args, k)} (was {v})'
               for k, v in sorted(was.items())
               if k not in ('resume', 'steps') and getattr(args, k, v) != v]
    if changed:
        print0('resuming with changed settings: ' + ', '.join(changed))
    return ckpt


def log_line(path, **record):
    """Rank 0 appends one JSON line, closed at once: a killed run keeps its log."""
    if is_main():
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        with open(path, 'a') as f:
            f.write(json.dumps(record) + '\n')


def git_revision():
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                              check=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def print_run(args, d=None):
    revision = git_revision()
    where = f', {d.world_size} process(es) on {d.device.type}' if d is not None else ''
    print0(f'git revision {revision}{where}')
    print0('  '.join(f'{k}={v}' for k, v in sorted(vars(args).items())))
    return revision


def start_run(args, out_dir, d):
    """A new run drops the log of an attempt without a ckpt."""
    os.makedirs(out_dir, exist_ok=True)
    revision, log = print_run(args, d), os.path.join(out_dir, 'log.jsonl')
    if d.is_main:
        if not args.resume and os.path.exists(log):
            os.remove(log)
        with open(os.path.join(out_dir, 'args.json'), 'w') as f:
            json.dump(dict(args=dict(sorted(vars(args).items())), git=revision,
                           world_size=d.world_size, torch=torch.__version__), f, indent=1)


# The backbone file, from pre-training to fine-tuning and probing.
HEAD = ('fc_norm.', 'head.')  # the classifier; pre-training never trains it
SIZE_KEYS = ('img_size', 'patch_size', 'embed_dim', 'depth', 'num_heads')


def save_backbone(path, backbone, extra):
    """No head, the untrained fc_norm: timm's ViT of num_classes=0 loads it strictly."""
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith('head.')}
    save_checkpoint(path, dict(config=dict(backbone.config), state_dict=state, **extra))


def size_name(config):
    for name, c in model.MODEL_CONFIGS.items():
        if all(config.get(k) == c[k] for k in SIZE_KEYS):
            return name
    return 'custom size'


def load_backbone(path, num_classes, drop_path_rate=0.1, expect=None):
    """(ViT, report) from a backbone.pt or ckpt.pt: all backbone tensors are required; fc_norm
    and head are new unless fine-tuned ones fit. `expect`: required config values."""
    ckpt = load_checkpoint(path)
    config, state = ckpt.get('config'), ckpt.get('state_dict', ckpt.get('model'))
    if config is None or state is None:
        raise ValueError(f'{path} is no backbone.pt/ckpt.pt (keys {", ".join(sorted(ckpt)[:8])})')
    for key, wanted in (expect or {}).items():
        if config.get(key) != wanted:
            theirs, asked = size_name(config), size_name({**config, **expect})
            fix = 'a --model of that size' if theirs == 'custom size' else f'--model {theirs}'
            raise ValueError(f'{path} holds a ViT with {key} {config.get(key)} ({theirs}); you '
                             f'asked for {key} {wanted} ({asked}): pass {fix} or another file')
    parts, dropped = {k.split('.')[0] for k in state}, []
    if 'backbone' in parts:  # a Pretrainer's state: keep the backbone
        dropped = sorted(parts - {'backbone'})
        state = {k.removeprefix('backbone.'): v for k, v in state.items()
                 if k.startswith('backbone.')}
    vit = model.VisionTransformer(**dict(config, num_classes=num_classes,
                                         drop_path_rate=drop_path_rate))
    own = vit.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(HEAD) or (  # pre-training: none
        'objective' not in ckpt and k in own and v.shape == own[k].shape)}
    missing, unexpected = vit.load_state_dict(state, strict=False)
    new = sorted({k.split('.')[0] for k in missing if k.startswith(HEAD)})
    missing = [k for k in missing if not k.startswith(HEAD)]
    if missing or unexpected:
        raise ValueError(f'{path} does not match its config\'s ViT: missing '
                         f'{missing[:5]}, unexpected {unexpected[:5]}')
    what = ''.join(f', {k} {ckpt[k]}' for k in ('objective', 'epochs') if k in ckpt)
    report = (f'loaded {path} ({size_name(config)} ViT{what}): {len(state)} tensors'
              + (f'; dropped pre-training parts: {", ".join(dropped)}' if dropped else '')
              + (f'; newly initialised: {", ".join(new)}' if new else ''))
    return vit, report


# Exact evaluation: the ranks' shards partition the split (DistributedSampler pads with repeats).

@torch.no_grad()
def evaluate(classifier, loader, device, dtype):
    """Top-1, top-5 (%), images; one final all-reduce, so ranks may hold different batch counts."""
    was_training = classifier.training
    classifier.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    for batch in loader:
        if batch is None:
            continue
        labels = batch[1].to(device)
        with autocast(dtype, device):
            logits = classifier(batch[0].to(device))
        hits = logits.float().topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(),
                               labels.new_tensor(len(labels))]).double()
    if dist.is_initialized():
        dist.all_reduce(counts)
    classifier.train(was_training)
    top1, top5, n = counts.tolist()
    return dict(top1=100 * top1 / max(n, 1), top5=100 * top5 / max(n, 1), count=int(n))


def record_result(path, **record):
    record = dict(record, git=git_revision())
    fields = '  '.join(f'{k}={v:.2f}' if isinstance(v, float) else f'{k}={v}'
                       for k, v in record.items())
    print0(f'result: {fields}')
    log_line(path, **record)


def eval_loader(dataset, batch_size, workers, d):
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                      sampler=range(d.rank, len(dataset), d.world_size),
                      collate_fn=data.collate_skip, pin_memory=d.device.type == 'cuda',
                      generator=torch.Generator())
