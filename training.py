"""The plumbing that pretrain.py, finetune.py and probe.py share: processes, flags, seeds, the
schedule and AdamW groups (Tab. 7-8), one precision path, the steps of a training loop, atomic
checkpoints, the backbone file, exact evaluation.

    import training
    d = training.setup_distributed('cpu')      # Dist(rank, local_rank, world_size, device, is_main)
    backbone, report = training.load_backbone('runs/pretrain_mapet/backbone.pt', num_classes=10)

Checkpoints hold only tensors and plain values (weights_only=True loads them) and are written to
`<path>.tmp`, then renamed: a kill during a write keeps the previous one.
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
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import data
import model

# ------------------------------
# Processes: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; plain `python` is one process.


Dist = namedtuple('Dist', 'rank local_rank world_size device is_main')


def setup_distributed(device=None):
    """Join torchrun's group (NCCL on GPUs, gloo on CPUs) or run alone; cuda is cuda:LOCAL_RANK."""
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
    """A stage's main(): a bad flag ends it in one line; else run(args, d) in the process group."""
    try:
        args = resolve_args(parser.parse_args(argv))
        device = getattr(args, 'device', None)
        if device is not None:
            check_device(device)
        world, accum = int(os.environ.get('WORLD_SIZE', 1)), getattr(args, 'accum', None)
        if accum and args.batch_size % (world * accum):
            raise ValueError(f'--batch-size {args.batch_size} is not divisible by {world} processes'
                             f' x --accum {accum}: use a multiple of {world * accum}')
    except ValueError as e:
        raise SystemExit(f'{script}: {e}') from None
    d = setup_distributed(device)
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
        raise ValueError(f'--device {name}: no GPU is visible to this process; pass --device cpu')


def check_args(args, positive=(), ranges=()):
    """ValueError for the first flag (None: unset) not > 0 or outside its (flag, low, high) row."""
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
    """The paper's 10 loader processes, or the CPUs this process may use if fewer."""
    return min(10, len(os.sched_getaffinity(0)))


def is_main():
    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get('RANK', 0))) == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs)


def seed_everything(seed, rank):
    """A stream per rank (mixup must differ between ranks), reproducible per seed."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)  # CPU and every GPU


# ------------------------------
# Optimisation: the schedule, the parameter groups, and one mixed-precision path.


def lr_at(step, total_steps, warmup_steps, peak_lr, min_lr, warmup_lr):
    """Linear warmup from warmup_lr to peak_lr, then cosine down to min_lr, per step (Tab. 7)."""
    if step < warmup_steps:
        return warmup_lr + (peak_lr - warmup_lr) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True)
class Schedule:
    """A run's steps and lrs; it stops at `last` (--steps); `micro`: images per process per pass."""
    steps_per_epoch: int
    total: int
    warmup: int
    last: int
    micro: int
    peak_lr: float
    min_lr: float
    warmup_lr: float

    def set_lr(self, optimizer, step):
        """Set each group's lr (the scheduled lr x its lr_scale); return the scheduled lr."""
        lr = lr_at(step, self.total, self.warmup, self.peak_lr, self.min_lr, self.warmup_lr)
        for group in optimizer.param_groups:
            group['lr'] = lr * group['lr_scale']
        return lr


def plan(args, num_images, d, reference_batch, warmup_lr):
    """The Schedule (lr scaled linearly from reference_batch, as BEiT / MAE) and its line."""
    spe = num_images // args.batch_size
    total, micro = args.epochs * spe, args.batch_size // (d.world_size * args.accum)
    s = Schedule(spe, total, round(args.warmup_epochs * spe), min(total, args.steps or total),
                 micro, args.lr * args.batch_size / reference_batch, args.min_lr, warmup_lr)
    return s, (f'batch {args.batch_size} = {d.world_size} process(es) x {args.accum} accum x '
               f'{micro}; lr {args.lr:g} x {args.batch_size}/{reference_batch} = {s.peak_lr:.3g}; '
               f'{spe} steps/epoch, {total} steps in all, {s.warmup} warmup')


NO_WEIGHT_DECAY = ('pos_embed', 'cls_token', 'mask_token')


def param_groups(module, weight_decay, lr_scale=None):
    """AdamW groups, no weight decay on 1-D tensors (biases, norms, layer scale) nor the position /
    CLS / mask tokens (Tab. 7); `lr_scale(name)`: a per-tensor lr factor. Frozen ones left out."""
    groups = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.rsplit('.', 1)[-1] in NO_WEIGHT_DECAY
        scale = float(lr_scale(name)) if lr_scale else 1.0
        group = groups.setdefault((no_decay, scale), dict(
            params=[], weight_decay=0.0 if no_decay else weight_decay, lr_scale=scale))
        group['params'].append(p)
    return list(groups.values())


DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float32': torch.float32}


def resolve_dtype(name, device):
    """'auto': bf16 on Ampere+ GPUs, fp16 on older ones (the paper's V100s), fp32 on CPUs (where
    autocast gains little and costs exactness)."""
    if name == 'auto':
        if device.type != 'cuda':
            return torch.float32
        # Not torch.cuda.is_bf16_supported(): it also says yes for a V100, where bf16 is emulated.
        ampere = torch.cuda.get_device_capability(device) >= (8, 0)
        return torch.bfloat16 if ampere else torch.float16
    return DTYPES[name]


def autocast(dtype, device):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(dtype, device):
    """Acts only for fp16: bf16 and fp32 have fp32's exponent range."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


# ------------------------------
# The steps of a training loop, the same for every stage that trains.


def wrap_ddp(module, d):
    """DistributedDataParallel around `module` on more than one process, else None."""
    if d.world_size == 1:
        return None
    ids = [d.local_rank] if d.device.type == 'cuda' else None
    return DistributedDataParallel(module, device_ids=ids)


def train_loader(dataset, d, seed, s, accum, workers):
    """Micro-batches of EpochSampler's keys; its own generator spares the process's stream."""
    sampler = data.EpochSampler(dataset, d.world_size, d.rank, seed,
                                per_epoch=s.steps_per_epoch * accum * s.micro)
    return DataLoader(dataset, batch_size=s.micro, sampler=sampler, num_workers=workers,
                      collate_fn=data.collate_skip, pin_memory=d.device.type == 'cuda',
                      persistent_workers=workers > 0, drop_last=True, generator=torch.Generator())


def steps(loader, start, s, accum, ddp, script):
    """(step, its `accum` micro-batches) from `start` to s.last. An epoch's order is a function of
    (seed, epoch) and a resumed run skips what it had taken: the same sequence."""
    for epoch in range(start // s.steps_per_epoch, -(-s.last // s.steps_per_epoch)):
        first = max(start, epoch * s.steps_per_epoch)
        loader.sampler.set_epoch(epoch)
        loader.sampler.skip = (first - epoch * s.steps_per_epoch) * accum * s.micro
        batches = iter(loader)
        for step in range(first, min(s.last, (epoch + 1) * s.steps_per_epoch)):
            yield step, micro_batches(batches, accum, ddp, f'{script}: every image of a batch at '
                                      f'step {step + 1} is unreadable')


def micro_batches(batches, accum, ddp, unreadable):
    """`accum` batches, all but the last under no_sync: gradients are all-reduced once a step."""
    for k in range(accum):
        batch = next(batches)
        if batch is None:
            raise SystemExit(unreadable)
        with ddp.no_sync() if ddp is not None and k < accum - 1 else contextlib.nullcontext():
            yield batch


def finish_step(stats, optimizer, scaler, clip_grad, step, script, ckpt_path):
    """Sum `stats` (loss sum, micro-batches, ...) over ranks: a non-finite loss stops every rank
    before the weights change. Then clip (0: none), step; (loss, sums, grad norm, overflow)."""
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
    scaler.step(optimizer)                  # float16: skipped when the gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss, sums, float(grad_norm), scaler.is_enabled() and scaler.get_scale() < scale


class Meter:
    """Means of named per-step numbers since the last read(), and the seconds taken."""

    def __init__(self):
        self.sums, self.count, self.start = {}, 0, time.time()

    def add(self, **values):
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def read(self):
        """(means, steps, seconds); a new window starts."""
        now = time.time()
        window = {k: v / self.count for k, v in self.sums.items()}, self.count, now - self.start
        self.sums, self.count, self.start = {}, 0, now
        return window


def peak_memory_mb(device):
    if device.type == 'cuda':
        return round(torch.cuda.max_memory_allocated(device) / 2 ** 20)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


# ------------------------------
# Files: checkpoints, the JSON-lines log, the run's arguments.


def save_checkpoint(path, obj):
    """Write <path>.tmp, fsync, rename over <path>: atomic."""
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
    except Exception as e:  # torch's message advises weights_only=False: unsafe, never shown
        raise ValueError(f'{path} is not a readable checkpoint of this project ({type(e).__name__}'
                         '): it is damaged or another kind of file; pass a ckpt.pt or backbone.pt '
                         'written by pretrain.py or finetune.py') from None


def resume_or_start(args, path, same):
    """--resume: the ckpt.pt at `path` if its `same` flags agree; else None, never overwriting."""
    if not args.resume:
        if os.path.exists(path):
            raise ValueError(f'{path} exists: pass --resume to continue that run, or another --out '
                             '(or delete it) to start a new one')
        return None
    ckpt = load_checkpoint(path)
    was = ckpt['args']
    for flag in same:
        if was[flag] != getattr(args, flag):
            f = '--' + flag.replace('_', '-')
            raise ValueError(f'{path} is a run with {f} {was[flag]}; this run asks for {f} '
                             f'{getattr(args, flag)}: pass {f} {was[flag]} to continue it, or '
                             'another --out to start a new run')
    changed = [f'--{k.replace("_", "-")} {getattr(args, k)} (was {v})'
               for k, v in sorted(was.items())
               if k not in ('resume', 'steps') and getattr(args, k, v) != v]
    if changed:
        print0('resuming with changed settings: ' + ', '.join(changed))
    return ckpt


def log_line(path, **record):
    """Rank 0 appends the record as one JSON line, closed at once: a killed run keeps its log."""
    if is_main():
        with open(path, 'a') as f:
            f.write(json.dumps(record) + '\n')


def git_revision():
    try:
        out = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
        return out.stdout.strip() if out.returncode == 0 else 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def print_run(args, d=None):
    """Print the git revision and the sorted arguments on rank 0; return the revision."""
    revision = git_revision()
    where = f', {d.world_size} process(es) on {d.device.type}' if d is not None else ''
    print0(f'git revision {revision}{where}')
    print0('  '.join(f'{k}={v}' for k, v in sorted(vars(args).items())))
    return revision


def start_run(args, out_dir, d):
    """print_run, out_dir/args.json; a new run drops the log of an attempt that saved no ckpt."""
    os.makedirs(out_dir, exist_ok=True)
    revision = print_run(args, d)
    if d.is_main and not args.resume and os.path.exists(os.path.join(out_dir, 'log.jsonl')):
        os.remove(os.path.join(out_dir, 'log.jsonl'))
    if d.is_main:
        with open(os.path.join(out_dir, 'args.json'), 'w') as f:
            json.dump(dict(args=dict(sorted(vars(args).items())), git=revision,
                           world_size=d.world_size, torch=torch.__version__), f, indent=1)
    return revision


# ------------------------------
# The backbone file: what pre-training hands to fine-tuning and probing.

HEAD = ('fc_norm.', 'head.')           # the classifier; pre-training never trains it
SIZE_KEYS = ('img_size', 'patch_size', 'embed_dim', 'depth', 'num_heads')


def save_backbone(path, backbone, extra):
    """{config, state_dict, **extra}: the ViT without its head, with the untrained fc_norm, so the
    file loads into timm's ViT of num_classes=0 with strict=True."""
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith('head.')}
    save_checkpoint(path, dict(config=dict(backbone.config), state_dict=state, **extra))


def size_name(config):
    """The MODEL_CONFIGS name of a config ('tiny', ...), or 'custom size'."""
    for name, c in model.MODEL_CONFIGS.items():
        if all(config.get(k) == c[k] for k in SIZE_KEYS):
            return name
    return 'custom size'


def load_backbone(path, num_classes, drop_path_rate=0.1, expect=None):
    """(ViT, report) from a backbone.pt or ckpt.pt: every backbone tensor must be there; fc_norm
    and head are new unless fine-tuned ones fit. `expect`: config values the caller requires."""
    ckpt = load_checkpoint(path)
    if 'config' not in ckpt or not ({'state_dict', 'model'} & set(ckpt)):
        raise ValueError(f'{path} is not a backbone.pt or ckpt.pt of this project (it holds '
                         f'{", ".join(sorted(ckpt)[:8])})')
    config, state = ckpt['config'], ckpt.get('state_dict', ckpt.get('model'))
    for key, wanted in (expect or {}).items():
        if config.get(key) != wanted:
            theirs, asked = size_name(config), size_name({**config, **expect})
            fix = 'a --model of that size' if theirs == 'custom size' else f'--model {theirs}'
            raise ValueError(f'{path} holds a ViT with {key} {config.get(key)} ({theirs}); you '
                             f'asked for {key} {wanted} ({asked}): pass {fix} or another file')
    dropped = []
    if any(k.startswith('backbone.') for k in state):  # a Pretrainer's state: keep the backbone
        dropped = sorted({k.split('.')[0] for k in state if not k.startswith('backbone.')})
        state = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
    vit = model.VisionTransformer(**{**config, 'num_classes': num_classes,
                                     'drop_path_rate': drop_path_rate})
    own = vit.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(HEAD) or (  # pre-training: none
        'objective' not in ckpt and k in own and v.shape == own[k].shape)}
    missing, unexpected = vit.load_state_dict(state, strict=False)
    new = sorted({k.split('.')[0] for k in missing if k.startswith(HEAD)})
    missing = [k for k in missing if not k.startswith(HEAD)]
    if missing or unexpected:
        raise ValueError(f'{path} does not match the ViT its config describes: missing '
                         f'{missing[:5]}, unexpected {unexpected[:5]}')
    what = ''.join(f', {k} {ckpt[k]}' for k in ('objective', 'epochs') if k in ckpt)
    report = (f'loaded {path} ({size_name(config)} ViT{what}): {len(state)} tensors'
              + (f'; dropped pre-training parts: {", ".join(dropped)}' if dropped else '')
              + (f'; newly initialised: {", ".join(new)}' if new else ''))
    return vit, report


# ------------------------------
# Exact distributed evaluation (finetune.py, probe.py): DistributedSampler pads the split with
# repeated images, so its accuracy counts some twice; here each rank takes its own indices, no
# padding, and the counts are summed over ranks.


class ShardSampler(torch.utils.data.Sampler):
    """Indices rank, rank + world, ... of 0..n-1: the shards partition the split exactly."""

    def __init__(self, n, world_size, rank):
        self.indices = range(rank, n, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


@torch.no_grad()
def evaluate(classifier, loader, device, dtype):
    """Top-1, top-5 (%) and images seen over all ranks' shards; one final all-reduce, so ranks
    may hold different numbers of batches."""
    was_training = classifier.training
    classifier.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1, top-5 correct, images
    for batch in loader:
        if batch is None:
            continue
        inputs, labels = batch[0].to(device), batch[1].to(device)
        with autocast(dtype, device):
            logits = classifier(inputs)
        hits = logits.float().topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(),
                               labels.new_tensor(len(labels))]).double()
    if dist.is_initialized():
        dist.all_reduce(counts)
    classifier.train(was_training)
    top1, top5, n = counts.tolist()
    return dict(top1=100 * top1 / max(n, 1), top5=100 * top5 / max(n, 1), count=int(n))


def record_result(path, **record):
    """Print a `result:` line and append it, with the git revision, to the JSON-lines `path`."""
    record = dict(record, git=git_revision())
    fields = '  '.join(f'{k}={v:.2f}' if isinstance(v, float) else f'{k}={v}'
                       for k, v in record.items())
    print0(f'result: {fields}')
    if is_main():
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    log_line(path, **record)


def eval_loader(dataset, batch_size, workers, d):
    """This rank's shard; its own generator spares the process's stream (exact resume)."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                      sampler=ShardSampler(len(dataset), d.world_size, d.rank),
                      collate_fn=data.collate_skip, pin_memory=d.device.type == 'cuda',
                      generator=torch.Generator())
