"""The plumbing that pretrain.py, finetune.py and probe.py share, in one place.

Distributed setup from torchrun's environment (the same script runs as plain `python`), rank-0
printing and logging, seeding and RNG state, the per-step schedule and AdamW parameter groups of
the paper's recipes (Tab. 7-8), one mixed-precision path, atomic checkpoints, and the backbone
file that pre-training writes and fine-tuning / probing read.

    import training
    d = training.setup_distributed()           # Dist(rank, local_rank, world_size, device, is_main)
    training.print0('only rank 0 prints this')
    backbone, report = training.load_backbone('runs/pretrain_mapet/backbone.pt', num_classes=10)

Checkpoints hold only tensors and plain Python values, so they load with
`torch.load(weights_only=True)`; they are written to `<path>.tmp` and renamed, so a kill during a
write leaves the previous checkpoint intact.
"""
import contextlib
import json
import math
import os
import random
import subprocess
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import data
import model

# ----------------------------------------------------------------------------------------------
# Processes: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; plain `python` is one process.


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool


def setup_distributed():
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs), or run as one process."""
    cuda = torch.cuda.is_available()
    if 'RANK' not in os.environ:
        return Dist(0, 0, 1, torch.device('cuda' if cuda else 'cpu'), True)
    rank, local_rank = int(os.environ['RANK']), int(os.environ['LOCAL_RANK'])
    device = torch.device('cuda', local_rank) if cuda else torch.device('cpu')
    if cuda:
        torch.cuda.set_device(device)  # before init, so NCCL binds each rank to its own GPU
    if not dist.is_initialized():
        dist.init_process_group('nccl' if cuda else 'gloo')
    return Dist(rank, local_rank, dist.get_world_size(), device, rank == 0)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def run_command(script, parser, resolve_args, run, argv=None):
    """What each stage's main() does: parse and check the flags (a bad value ends the command
    with one line naming the script), join torchrun's processes, run(args, d), leave the group."""
    try:
        args = resolve_args(parser.parse_args(argv))
    except ValueError as e:
        raise SystemExit(f'{script}: {e}') from None
    d = setup_distributed()
    try:
        return run(args, d)
    finally:
        cleanup_distributed()


def is_main():
    return (dist.get_rank() if dist.is_initialized() else int(os.environ.get('RANK', 0))) == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# Randomness: seeds per rank, and the full RNG state for an exact resume.


def seed_everything(seed, rank):
    """Different streams per rank (drop path must differ between ranks), reproducible per seed."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)  # CPU and every GPU


def rng_state():
    """This process's torch (CPU, current GPU), numpy and python RNG states, as plain values."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                numpy=[torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
                python=random.getstate())


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    if state['cuda'] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])
    keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state(('MT19937', keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state['python'])


def restore_rng_state(ckpt, d, draws):
    """This rank's RNG state from ckpt (saved by all_rng_states), restored last: building the model
    drew from the streams. On another number of processes there is no state per rank: say which
    `draws` will differ."""
    if len(ckpt['rng']) == d.world_size:
        set_rng_state(ckpt['rng'][d.rank])
    else:
        print0(f'resuming on {d.world_size} processes, saved on {len(ckpt["rng"])}: {draws} draws will differ')


def all_rng_states():
    """Every rank's rng_state(), in rank order (on every rank): rank 0 saves them all."""
    state = rng_state()
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


# ----------------------------------------------------------------------------------------------
# Optimisation: the schedule, the parameter groups, and one mixed-precision path.


def lr_at(step, total_steps, warmup_steps, peak_lr, min_lr, warmup_lr):
    """Linear warmup from warmup_lr to peak_lr, then cosine down to min_lr, per step (Tab. 7)."""
    if step < warmup_steps:
        return warmup_lr + (peak_lr - warmup_lr) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


NO_WEIGHT_DECAY = ('pos_embed', 'cls_token', 'mask_token')


def param_groups(module, weight_decay, lr_scale=None):
    """AdamW groups: no weight decay on biases, norms and layer-scale gammas (every 1-D tensor)
    nor on the position / CLS / mask tokens (Tab. 7). `lr_scale(name) -> float` sets a per-tensor
    learning-rate factor (fine-tuning's layer-wise decay), stored as group['lr_scale']; the training
    loop sets group['lr'] = lr * group['lr_scale'] every step. Frozen parameters are left out."""
    groups = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.rsplit('.', 1)[-1] in NO_WEIGHT_DECAY
        scale = float(lr_scale(name)) if lr_scale else 1.0
        group = groups.setdefault((no_decay, scale), dict(params=[], weight_decay=0.0 if no_decay else weight_decay,
                                                          lr_scale=scale))
        group['params'].append(p)
    return list(groups.values())


DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float32': torch.float32}


def resolve_dtype(name, device):
    """'auto': bf16 on GPUs with native bf16 (Ampere and later), fp16 on older ones such as the
    paper's V100s, fp32 on CPUs (where autocast gains little and costs exactness)."""
    if name == 'auto':
        if device.type != 'cuda':
            return torch.float32
        # Not torch.cuda.is_bf16_supported(): it also says yes for a V100, where bf16 is emulated.
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    if name not in DTYPES:
        raise ValueError(f'unknown dtype {name!r}: use auto, {", ".join(DTYPES)}')
    return DTYPES[name]


def autocast(dtype, device):
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def grad_scaler(dtype, device):
    """A GradScaler that only acts for fp16 (bf16 and fp32 have fp32's exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


# ----------------------------------------------------------------------------------------------
# Files: checkpoints, the JSON-lines log, the run's arguments.


def save_checkpoint(path, obj):
    """Write to <path>.tmp in the same directory, fsync, then rename over <path> (atomic)."""
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
    except Exception as e:  # truncated, not a torch file, or pickled objects beyond tensors
        cause = (str(e).strip().splitlines() or [''])[0]
        raise ValueError(f'{path} is not a readable checkpoint ({type(e).__name__}: {cause[:200]}): '
                         'it is damaged or was not written by this project') from None


def report_changed_settings(was, args):
    """Print the flags a resumed run changed (all but --resume and --steps) against its saved args."""
    changed = [f'--{k.replace("_", "-")} {getattr(args, k)} (was {v})' for k, v in sorted(was.items())
               if k not in ('resume', 'steps') and getattr(args, k, v) != v]
    if changed:
        print0('resuming with changed settings: ' + ', '.join(changed))


class JsonLogger:
    """Rank 0 appends one JSON object per line and flushes it, so a killed run keeps its log."""

    def __init__(self, path):
        self.file = open(path, 'a') if is_main() else None

    def log(self, **record):
        if self.file:
            self.file.write(json.dumps(record) + '\n')
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


def git_revision():
    try:
        out = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def print_run(args, d=None):
    """Print the git revision and the sorted arguments on rank 0 (every script starts so); the revision."""
    revision = git_revision()
    where = f', {d.world_size} process(es) on {d.device.type}' if d is not None else ''
    print0(f'git revision {revision}{where}')
    print0('  '.join(f'{k}={v}' for k, v in sorted(vars(args).items())))
    return revision


def start_run(args, out_dir, d):
    """print_run, and save the arguments and revision to out_dir/args.json."""
    os.makedirs(out_dir, exist_ok=True)
    revision = print_run(args, d)
    if d.is_main:
        with open(os.path.join(out_dir, 'args.json'), 'w') as f:
            json.dump(dict(args=dict(sorted(vars(args).items())), git=revision, world_size=d.world_size,
                           torch=torch.__version__), f, indent=1)
    return revision


# ----------------------------------------------------------------------------------------------
# The backbone file: what pre-training hands to fine-tuning and probing.

HEAD = ('fc_norm.', 'head.')           # the classifier; pre-training never trains it
SIZE_KEYS = ('img_size', 'patch_size', 'embed_dim', 'depth', 'num_heads')


def save_backbone(path, backbone, extra):
    """{'config', 'state_dict' without fc_norm / head, **extra (objective, epochs, tokens, ...)}."""
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith(HEAD)}
    save_checkpoint(path, dict(config=dict(backbone.config), state_dict=state, **extra))


def size_name(config):
    """The MODEL_CONFIGS name of a ViT config ('tiny', ...), or a description of it."""
    for name, c in model.MODEL_CONFIGS.items():
        if all(config.get(k) == c[k] for k in SIZE_KEYS):
            return name
    return 'custom size'


def load_backbone(path, num_classes, drop_path_rate=0.1, expect=None):
    """A VisionTransformer from a backbone.pt or a pre-training ckpt.pt: (model, report).

    Every backbone tensor must be in the file (strict); fc_norm and head are newly initialised
    unless the file holds them at the right shape (a fine-tuned checkpoint). The parts that only
    pre-training uses (mask token, norm, decoder) are dropped. `expect`: config values the caller
    requires (e.g. the sizes of the user's --model); a mismatch is refused, naming both.
    """
    ckpt = load_checkpoint(path)
    if 'config' not in ckpt or not ({'state_dict', 'model'} & set(ckpt)):
        raise ValueError(f'{path} is neither a backbone.pt nor a ckpt.pt written by pretrain.py '
                         f'(it holds {", ".join(sorted(ckpt)[:8])})')
    config, state = ckpt['config'], ckpt.get('state_dict', ckpt.get('model'))
    for key, wanted in (expect or {}).items():
        if config.get(key) != wanted:
            theirs, asked = size_name(config), size_name({**config, **expect})
            fix = 'a --model of that size' if theirs == 'custom size' else f'--model {theirs}'
            raise ValueError(f'{path} holds a ViT with {key} {config.get(key)} ({theirs}); you asked for {key} '
                             f'{wanted} ({asked}): pass {fix} or another checkpoint')
    dropped = []
    if any(k.startswith('backbone.') for k in state):  # a Pretrainer's state: keep the backbone
        dropped = sorted({k.split('.')[0] for k in state if not k.startswith('backbone.')})
        state = {k[len('backbone.'):]: v for k, v in state.items() if k.startswith('backbone.')}
        state = {k: v for k, v in state.items() if not k.startswith(HEAD)}  # never trained there
    vit = model.VisionTransformer(**{**config, 'num_classes': num_classes, 'drop_path_rate': drop_path_rate})
    own = vit.state_dict()
    state = {k: v for k, v in state.items() if not (k.startswith(HEAD) and (k not in own or v.shape != own[k].shape))}
    missing, unexpected = vit.load_state_dict(state, strict=False)
    new = sorted({k.split('.')[0] for k in missing if k.startswith(HEAD)})
    missing = [k for k in missing if not k.startswith(HEAD)]
    if missing or unexpected:
        raise ValueError(f'{path} does not match the ViT its config describes: missing {missing[:5]}, '
                         f'unexpected {unexpected[:5]}')
    what = ', '.join(f'{k} {ckpt[k]}' for k in ('objective', 'epochs') if k in ckpt)
    report = (f'loaded {path} ({size_name(config)} ViT{", " + what if what else ""}): {len(state)} tensors'
              + (f'; dropped pre-training parts: {", ".join(dropped)}' if dropped else '')
              + (f'; newly initialised: {", ".join(new)}' if new else ''))
    return vit, report


# ----------------------------------------------------------------------------------------------
# Exact distributed evaluation (finetune.py, probe.py): every validation image counted once.
# DistributedSampler pads the split with repeated images until it divides by the world size, so
# its accuracy counts some images twice; here each rank takes its own indices without padding
# and the correct counts and totals are summed over ranks.


class ShardSampler(torch.utils.data.Sampler):
    """Indices rank, rank + world, rank + 2 world, ... of 0..n-1: the shards partition the split
    exactly, without padding (they differ in size by at most one)."""

    def __init__(self, n, world_size, rank):
        self.indices = range(rank, n, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


@torch.no_grad()
def evaluate(classifier, loader, device, dtype):
    """Top-1 and top-5 accuracy (%) and the number of images seen, summed over all ranks.

    `loader` yields (inputs, labels) batches of this rank's shard (ShardSampler), or None for a
    batch of unreadable images; `classifier(inputs)` gives logits (B, classes). Ranks may hold
    different numbers of batches: the only collective is the final all-reduce.
    """
    was_training = classifier.training
    classifier.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 correct, top-5 correct, images
    for batch in loader:
        if batch is None:
            continue
        inputs, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with autocast(dtype, device):
            logits = classifier(inputs)
        top = logits.float().topk(min(5, logits.shape[1]), dim=1).indices        # (B, 5)
        hits = top == labels[:, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), labels.new_tensor(len(labels))]).double()
    if dist.is_initialized():
        dist.all_reduce(counts)
    classifier.train(was_training)
    top1, top5, n = counts.tolist()
    return dict(top1=100 * top1 / max(n, 1), top5=100 * top5 / max(n, 1), count=int(n))


def record_result(path, **record):
    """Print one `result:` line on rank 0 and append the record to the JSON-lines file `path`,
    one line per run (results.jsonl), so a table of runs can be built from it."""
    record = dict(record, git=git_revision())
    fields = '  '.join(f'{k}={v:.2f}' if isinstance(v, float) else f'{k}={v}' for k, v in record.items())
    print0(f'result: {fields}')
    if is_main():
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        logger = JsonLogger(path)
        logger.log(**record)
        logger.close()


def eval_loader(dataset, batch_size, workers, d):
    """This rank's shard of the validation split, no image repeated (ShardSampler). Its private
    generator keeps evaluation off the process's stream, so a run that stops and evaluates
    mid-epoch resumes exactly."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                      sampler=ShardSampler(len(dataset), d.world_size, d.rank),
                      collate_fn=data.collate_skip, pin_memory=d.device.type == 'cuda',
                      generator=torch.Generator())
