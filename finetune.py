"""Fine-tune a pre-trained ViT for image classification with the paper's recipe.

Paper: Sec. 5.1 "Image classification setup" (the final layer's patch tokens, average-pooled, feed
a softmax classifier), Tab. 1-3 (top-1 after fine-tuning on ImageNet-1k; Tab. 2's "ViT" row is the
same recipe from a random initialisation: --checkpoint none), App. D and Tab. 8 (the recipe: AdamW,
peak lr 2.5e-4 / 5e-3 / 5e-4 at batch 1024 for ViT-T / S / B, 300 / 200 / 100 epochs, layer-wise lr
decay none / 0.65 / 0.65, 20 warmup epochs from 1e-6, cosine to 1e-6, weight decay 0.05, label
smoothing 0.1, drop path 0.1, RandAugment 9/0.5, random erasing 0.25, mixup 0.8, cutmix 1.0, no
gradient clipping), App. A (the transfer sets: food101, stanford_cars, fgvc_aircraft).

    python finetune.py --checkpoint runs/pretrain_mapet/backbone.pt   # demo: micro ViT, ~4 min on 2 CPUs
    python finetune.py --checkpoint none                               # the same from scratch (Tab. 2 "ViT")
    python finetune.py --checkpoint runs/finetune_mapet/ckpt.pt --eval-only
    python finetune.py --checkpoint runs/pretrain_mapet/backbone.pt --resume  # continue runs/finetune_mapet
    torchrun --nproc_per_node=8 finetune.py --checkpoint runs/pretrain_mapet_base/backbone.pt \\
        --data /path/imagenet --accum 2           # ViT-B: 100 epochs, batch 1024 = 8 GPUs x 2 accum x 64
    python finetune.py --checkpoint PRETRAINED_TINY --data cifar100 --epochs 50 --batch-size 256

Writes to --out (default runs/finetune_<pre-training run>[_<dataset>]): ckpt.pt (model, optimizer,
loss scaler, step, every rank's RNG state; rewritten atomically after every epoch; --resume
continues it exactly), classifier.pt (the fine-tuned ViT as a plain state dict in timm's layout:
it loads into timm.create_model('vit_<size>_patch16_224', global_pool='avg', init_values=0.1,
num_classes=C) with strict=True), classifier.json (that timm call, the classes, the input
normalisation), log.jsonl (one line per epoch), args.json; and one line in --results.

--data demo keeps Tab. 8's optimiser, label smoothing and drop path but turns RandAugment, random
erasing, mixup and cutmix off: in a few epochs on 5,000 small images they keep the micro ViT at
chance (the DEMO defaults below).

Every random draw of a training sample (crop, flip, RandAugment, erasing) comes from a seed that
depends only on (--seed, epoch, image index), as in pretrain.py; mixup / cutmix and drop path draw
from each process's stream, which ckpt.pt saves. Validation counts every image exactly once on
any number of processes (training.evaluate).
"""
import argparse
import contextlib
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.transforms import v2
from tqdm import tqdm

import data
import model
import training
from training import print0

# Tab. 8, per model size: peak lr at batch 1024, epochs, layer-wise lr decay (1.0 = none). The
# micro size is not in the paper: its values are the demo's, tuned to learn in a few CPU minutes.
SIZES = {
    'micro': dict(lr=1.6e-2, epochs=4, layer_decay=0.75),
    'tiny': dict(lr=2.5e-4, epochs=300, layer_decay=1.0),
    'small': dict(lr=5e-3, epochs=200, layer_decay=0.65),
    'base': dict(lr=5e-4, epochs=100, layer_decay=0.65),
}
# The defaults that --data selects: the paper's (Tab. 8; workers and crops as in BEiT / timm), or
# the demo's. On 32 px images a crop of 8% of the area loses the shape; and in a few epochs on
# 5,000 images RandAugment, erasing, mixup and cutmix keep the micro ViT at chance (measured: 10-12%
# top-1 after 2 epochs with them, 14% without), so the demo turns them off.
PAPER = dict(batch_size=1024, warmup_epochs=20, workers=10, **data.PAPER_CROPS, randaug=9, reprob=0.25,
             mixup=0.8, cutmix=1.0)
DEMO = dict(batch_size=128, warmup_epochs=0.5, workers=0, **data.DEMO_CROPS, randaug=0, reprob=0, mixup=0,
            cutmix=0)
REFERENCE_BATCH = 1024             # Tab. 8's learning rates are for batch 1024, scaled linearly
WARMUP_LR = 1e-6                   # Tab. 8
BETAS, EPS = (0.9, 0.999), 1e-8    # Tab. 8: AdamW


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0] + ' (paper Sec. 5.1, Tab. 1-3, 8)')
    per_size = lambda key: ('[Tab. 8: ' + ', '.join(f'{s} {v[key]:g}' for s, v in SIZES.items() if s != 'micro')
                            + f'; micro, the demo\'s: {SIZES["micro"][key]:g}]')
    default = lambda key: f'[paper: {PAPER[key]}; --data demo: {DEMO[key]}]'
    g = p.add_argument_group('model')
    g.add_argument('--checkpoint', required=True, help='backbone.pt or ckpt.pt written by pretrain.py (or a ckpt.pt '
                   'of this script), or "none": a randomly initialised ViT, the paper\'s "ViT" row of Tab. 2')
    g.add_argument('--model', default=None, choices=list(model.MODEL_CONFIGS), help='ViT size; must agree with the '
                   'checkpoint [the checkpoint\'s size; with --checkpoint none: base, --data demo: micro]')
    g.add_argument('--drop-path', type=float, default=0.1, help='stochastic depth rate [paper: 0.1]')
    g = p.add_argument_group('data')
    g.add_argument('--data', default='demo', help='demo | an ImageFolder root with train/ and val/ (ImageNet) | '
                   + ' | '.join(data.TORCHVISION_DATASETS) + ' (App. A: food101, stanford_cars, fgvc_aircraft) [demo]')
    g.add_argument('--data-root', default='data', help='where torchvision datasets are (downloaded) [data]')
    g.add_argument('--workers', type=int, default=None, help=f'data loader processes per GPU {default("workers")}')
    g.add_argument('--crop-scale', type=float, default=None, help='smallest area fraction of the bicubic random '
                   f'resized crop {default("crop_scale")}')
    g.add_argument('--eval-crop', type=float, default=None, help='evaluation: resize the short side to '
                   f'img_size / EVAL_CROP (bicubic), then take the centre img_size square {default("eval_crop")}')
    g = p.add_argument_group('augmentation and regularisation (Tab. 8)')
    g.add_argument('--randaug', type=float, default=None, help='RandAugment magnitude, of 10, two ops per image; '
                   f'0 = off {default("randaug")}')
    g.add_argument('--randaug-std', type=float, default=0.5, help='std of the RandAugment magnitude, redrawn per '
                   'op (timm\'s rand-m9-mstd0.5) [paper: 0.5]')
    g.add_argument('--reprob', type=float, default=None, help=f'random erasing probability {default("reprob")}')
    g.add_argument('--mixup', type=float, default=None, help=f'mixup Beta alpha; 0 = off {default("mixup")}')
    g.add_argument('--cutmix', type=float, default=None, help='cutmix Beta alpha; 0 = off. With both on, each batch '
                   f'gets one of the two at even odds {default("cutmix")}')
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing [paper: 0.1]')
    g = p.add_argument_group('optimisation (Tab. 8)')
    g.add_argument('--epochs', type=int, default=None, help=f'epochs {per_size("epochs")}')
    g.add_argument('--batch-size', type=int, default=None, help='global batch; each process takes batch / '
                   f'(processes x accum) per forward pass {default("batch_size")}')
    g.add_argument('--accum', type=int, default=1, help='gradient accumulation steps [1]')
    g.add_argument('--lr', type=float, default=None, help='peak learning rate at batch 1024, scaled linearly to '
                   f'--batch-size {per_size("lr")}')
    g.add_argument('--layer-decay', type=float, default=None, help='layer-wise lr decay: block i of a depth-L '
                   f'ViT trains at lr x decay^(L - i), the patch embedding at decay^(L + 1) {per_size("layer_decay")}')
    g.add_argument('--min-lr', type=float, default=1e-6, help='learning rate at the end of the cosine [paper: 1e-6]')
    g.add_argument('--warmup-epochs', type=float, default=None, help='linear warmup from 1e-6, per step '
                   f'{default("warmup_epochs")}')
    g.add_argument('--weight-decay', type=float, default=0.05, help='AdamW weight decay, none on biases, norms, '
                   'tokens, layer scale [paper: 0.05]')
    g.add_argument('--dtype', default='auto', choices=('auto', 'bfloat16', 'float16', 'float32'),
                   help='auto: bfloat16 on Ampere and later GPUs, float16 with loss scaling on older ones (V100), '
                   'float32 on CPU [auto]')
    g = p.add_argument_group('run')
    g.add_argument('--out', default=None, help='output directory [runs/finetune_<pre-training run>[_<dataset>]]')
    g.add_argument('--resume', action='store_true', help='continue the run in --out from its ckpt.pt, exactly')
    g.add_argument('--eval-only', action='store_true', help='only evaluate --checkpoint, a ckpt.pt of this script '
                   'for --data\'s classes')
    g.add_argument('--seed', type=int, default=0, help='seeds the initialisation, data order and every draw [0]')
    g.add_argument('--steps', type=int, default=None, help='stop after this many optimizer steps in all (then '
                   'evaluate), the schedule still spanning --epochs: for smoke tests, or to split a run into jobs')
    g.add_argument('--results', default=os.path.join('runs', 'results.jsonl'), help='JSON-lines file the result '
                   'line is appended to [runs/results.jsonl]')
    return p


def resolve_args(args):
    """Fill the defaults that --data selects (those of the model size come in resolve_size) and
    check ranges; raises ValueError."""
    for key, value in (DEMO if args.data == 'demo' else PAPER).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ('epochs', 'batch_size', 'accum', 'lr', 'steps', 'crop_scale', 'eval_crop', 'layer_decay'):
        value = getattr(args, key)
        if value is not None and not value > 0:
            raise ValueError(f'--{key.replace("_", "-")} must be positive, got {value}')
    for key, high in (('crop_scale', 1), ('eval_crop', 1), ('layer_decay', 1), ('reprob', 1), ('smoothing', 1),
                      ('randaug', 10)):
        value = getattr(args, key)
        if value is not None and not 0 <= value <= high:
            raise ValueError(f'--{key.replace("_", "-")} must be in [0, {high}], got {value}')
    for key in ('mixup', 'cutmix', 'randaug_std', 'warmup_epochs', 'min_lr', 'weight_decay', 'drop_path', 'workers'):
        if getattr(args, key) < 0:
            raise ValueError(f'--{key.replace("_", "-")} must not be negative, got {getattr(args, key)}')
    if args.eval_only and (args.resume or args.checkpoint == 'none'):
        raise ValueError('--eval-only evaluates the classifier in --checkpoint, a ckpt.pt of finetune.py; it takes '
                         'neither --resume nor --checkpoint none')
    if args.out is None:
        source = 'scratch' if args.checkpoint == 'none' else os.path.basename(
            os.path.dirname(os.path.abspath(args.checkpoint))).removeprefix('pretrain_')
        dataset = '' if args.data == 'demo' else '_' + os.path.basename(os.path.normpath(args.data))
        args.out = os.path.join('runs', f'finetune_{source}{dataset}')
    return args


def resolve_size(args, size):
    """The per-size defaults of Tab. 8, once the model size is known."""
    args.model = size
    for key, value in SIZES[size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


# ----------------------------------------------------------------------------------------------
# Data (Tab. 8): bicubic random resized crop, flip, RandAugment, random erasing for training;
# a bicubic resize and a centre crop for evaluation.


class RandAugment(transforms.RandAugment):
    """torchvision's RandAugment (two ops per image, torchvision's op set) on timm's magnitude
    scale: magnitude M of 10 is M/10 of each op's strongest setting, redrawn for every op from
    N(M, std) clipped to [0, 10], as timm's 'rand-m9-mstd0.5' does (Tab. 8's "9/0.5").

    torchvision reads self.magnitude (an index into 101 bins) once per op: a property lets each
    read be a fresh draw. Empty areas are filled with the mean colour, as in timm."""

    def __init__(self, magnitude, std):
        fill = [round(255 * m) for m in data.IMAGENET_MEAN]
        super().__init__(num_ops=2, magnitude=magnitude, num_magnitude_bins=101,
                         interpolation=transforms.InterpolationMode.BICUBIC, fill=fill)
        self.std = std

    @property
    def magnitude(self):
        m = self.mean if self.std == 0 else float(torch.normal(self.mean, self.std, ()))
        return round(10 * min(10.0, max(0.0, m)))          # bin 0..100

    @magnitude.setter
    def magnitude(self, value):
        self.mean = value


def train_transform(img_size, args):
    bicubic = transforms.InterpolationMode.BICUBIC
    return transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=(args.crop_scale, 1.0), interpolation=bicubic),
        transforms.RandomHorizontalFlip(),
        *([RandAugment(args.randaug, args.randaug_std)] if args.randaug > 0 else []),
        transforms.ToTensor(),
        transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD),
        # timm's 'pixel' mode: the erased box gets per-pixel normal noise
        *([transforms.RandomErasing(p=args.reprob, value='random')] if args.reprob > 0 else []),
    ])


# ----------------------------------------------------------------------------------------------
# The model: the pre-trained backbone + a new fc_norm and head (Sec. 5.1), layer-wise lr decay.


def build_classifier(args, num_classes):
    """The ViT with a `num_classes` head, its weights from --checkpoint; (model, report)."""
    if args.checkpoint == 'none':
        resolve_size(args, args.model or ('micro' if args.data == 'demo' else 'base'))
        vit = model.create_model(args.model, num_classes=num_classes, drop_path_rate=args.drop_path)
        return vit, f'--checkpoint none: a randomly initialised {args.model} ViT (Tab. 2, "ViT" row)'
    if os.path.isfile(args.checkpoint) and args.checkpoint.endswith('classifier.pt'):
        raise ValueError(f'{args.checkpoint} is an exported timm-layout state dict; pass the ckpt.pt beside it')
    expect = {k: model.MODEL_CONFIGS[args.model][k] for k in training.SIZE_KEYS} if args.model else None
    vit, report = training.load_backbone(args.checkpoint, num_classes, args.drop_path, expect)
    size = training.size_name(vit.config)
    if size not in SIZES:
        shape = ', '.join(f'{k} {vit.config[k]}' for k in training.SIZE_KEYS)
        raise ValueError(f'{args.checkpoint} holds a ViT of no known size ({shape}): finetune.py runs the sizes '
                         f'{", ".join(SIZES)} of model.MODEL_CONFIGS')
    resolve_size(args, size)
    return vit, report


def layer_id(name, depth):
    """0 for the patch embedding, CLS and position embeddings, i + 1 for block i, depth + 1 for
    fc_norm and head (BEiT's layer-wise decay, Tab. 8)."""
    if name.startswith(('patch_embed.', 'cls_token', 'pos_embed')):
        return 0
    if name.startswith('blocks.'):
        return int(name.split('.')[1]) + 1
    return depth + 1


def layer_decay_groups(vit, weight_decay, layer_decay):
    """AdamW groups with lr scale layer_decay ** (depth + 1 - layer_id): 1.0 for the head, the
    lowest for the patch embedding (Tab. 8: 0.65 for ViT-S/B, none for ViT-T)."""
    depth = len(vit.blocks)
    return training.param_groups(vit, weight_decay, lambda name: layer_decay ** (depth + 1 - layer_id(name, depth)))


def timm_call(vit):
    """The timm constructor that the exported state dict loads into with strict=True."""
    c, size = vit.config, training.size_name(vit.config)
    common = f"global_pool='avg', init_values={c['layer_scale']}, num_classes={c['num_classes']}"
    if size in ('tiny', 'small', 'base'):
        return f"timm.create_model('vit_{size}_patch{c['patch_size']}_{c['img_size']}', {common})"
    shape = ', '.join(f'{k}={c[k]}' for k in ('img_size', 'patch_size', 'embed_dim', 'depth', 'num_heads'))
    return f'timm.models.vision_transformer.VisionTransformer({shape}, {common})'


def export_classifier(out, vit, classes):
    """classifier.pt: the state dict alone, timm's key names; classifier.json: how to load it."""
    training.save_checkpoint(os.path.join(out, 'classifier.pt'), vit.state_dict())
    info = dict(timm=timm_call(vit), strict=True, config=vit.config, classes=list(classes),
                mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD)
    with open(os.path.join(out, 'classifier.json'), 'w') as f:
        json.dump(info, f, indent=1)


# ----------------------------------------------------------------------------------------------
# Training (Tab. 8): mixup / cutmix, label smoothing, AdamW with layer-wise decay, cosine.


def batch_mixer(args, num_classes):
    """(images, labels) -> (images, soft targets (B, C)). Tab. 8's mixup 0.8 / cutmix 1.0 are the
    Beta alphas of timm's Mixup; with both on, each batch takes one of the two at even odds (timm's
    mixup_prob 1.0, switch_prob 0.5). Label smoothing is applied to the soft targets after."""
    mixes = ([v2.MixUp(alpha=args.mixup, num_classes=num_classes)] if args.mixup > 0 else []) + \
            ([v2.CutMix(alpha=args.cutmix, num_classes=num_classes)] if args.cutmix > 0 else [])
    mix = v2.RandomChoice(mixes) if mixes else (lambda images, labels: (images, F.one_hot(labels, num_classes)))
    s = args.smoothing

    def apply(images, labels):
        images, targets = mix(images, labels)
        return images, targets.float() * (1 - s) + s / num_classes
    return apply


def soft_cross_entropy(logits, targets):
    return torch.sum(-targets * logits.float().log_softmax(dim=-1), dim=-1).mean()


def check_resume(ckpt, args, path):
    was = ckpt['args']
    for key in ('checkpoint', 'model', 'data', 'batch_size'):
        if was[key] != getattr(args, key):
            flag = '--' + key.replace('_', '-')
            raise ValueError(f'{path} is a run with {flag} {was[key]}; this run asks for {flag} {getattr(args, key)}: '
                             f'pass {flag} {was[key]} to continue it, or another --out to start a new run')
    training.report_changed_settings(was, args)


def save(path, vit, optimizer, scaler, step, args, d):
    rng = training.all_rng_states()  # every rank takes part; rank 0 writes
    if d.is_main:
        training.save_checkpoint(path, dict(model=vit.state_dict(), config=dict(vit.config),
                                            optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step,
                                            args=vars(args), rng=rng))


def main(argv=None):
    """Fine-tune (or with --eval-only evaluate); returns a summary dict (top1, top5, count, ...)."""
    return training.run_command('finetune.py', get_args_parser(), resolve_args, run, argv)


def run(args, d):
    device, W = d.device, d.world_size
    ckpt_path = os.path.join(args.out, 'ckpt.pt')
    try:
        if args.batch_size % (W * args.accum):
            raise ValueError(f'--batch-size {args.batch_size} is not divisible by {W} processes x --accum '
                             f'{args.accum}: use a multiple of {W * args.accum}')
        ckpt = training.load_checkpoint(ckpt_path) if args.resume else None
        if not args.resume and not args.eval_only and os.path.exists(ckpt_path):
            raise ValueError(f'{ckpt_path} exists: pass --resume to continue that run, or another --out (or delete '
                             'it) to start a new one')
        training.seed_everything(args.seed, d.rank)
        # The classes first (the head's size), then the model (its size fixes the image size).
        classes = data.build_dataset(args.data, 'val', args.data_root).classes
        vit, report = build_classifier(args, len(classes))
        if ckpt is not None:
            check_resume(ckpt, args, ckpt_path)
        img_size = vit.patch_embed.img_size
        val = data.build_dataset(args.data, 'val', args.data_root, data.eval_transform(img_size, args.eval_crop))
        dtype = training.resolve_dtype(args.dtype, device)
        if args.eval_only and 'newly initialised' in report:
            raise ValueError(f'{args.checkpoint} holds no classifier for the {len(classes)} classes of {args.data}: '
                             '--eval-only needs a ckpt.pt written by finetune.py for this dataset')
    except ValueError as e:
        raise SystemExit(f'finetune.py: {e}') from None
    print0(report)
    vit.to(device)
    micro = args.batch_size // (W * args.accum)            # images per process per forward pass
    start_time = time.time()
    if args.eval_only:
        result = training.evaluate(vit, training.eval_loader(val, micro, args.workers, d), device, dtype)
        return finish(args, result, 0, time.time() - start_time, 'eval')

    try:
        train = data.build_dataset(args.data, 'train', args.data_root, train_transform(img_size, args))
        if len(train) < args.batch_size:
            raise ValueError(f'{args.data} has {len(train)} training images, fewer than one --batch-size '
                             f'{args.batch_size}')
    except ValueError as e:
        raise SystemExit(f'finetune.py: {e}') from None
    training.start_run(args, args.out, d)
    optimizer = torch.optim.AdamW(layer_decay_groups(vit, args.weight_decay, args.layer_decay), lr=0.0, betas=BETAS,
                                  eps=EPS, fused=device.type == 'cuda')  # lr: set every step from the schedule
    scaler = training.grad_scaler(dtype, device)
    start_step = 0
    if ckpt is not None:
        vit.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
        start_step = ckpt['step']
        training.restore_rng_state(ckpt, d, 'mixup and drop path')
    elif d.is_main and os.path.exists(os.path.join(args.out, 'log.jsonl')):
        os.remove(os.path.join(args.out, 'log.jsonl'))  # a log of an earlier attempt that never reached a checkpoint

    peak_lr = args.lr * args.batch_size / REFERENCE_BATCH  # linear scaling rule
    steps_per_epoch = len(train) // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    last_step = min(total_steps, args.steps or total_steps)
    print0(f'fine-tuning a {args.model} ViT on {args.data}: {len(train)} training / {len(val)} validation images, '
           f'{len(classes)} classes, {img_size} px')
    print0(f'batch {args.batch_size} = {W} process(es) x {args.accum} accum x {micro}; lr {args.lr:g} x '
           f'{args.batch_size}/{REFERENCE_BATCH} = {peak_lr:.3g}, layer decay {args.layer_decay:g}; {steps_per_epoch} '
           f'steps/epoch, {total_steps} steps in all, {warmup_steps} warmup; {str(dtype).replace("torch.", "")}')
    if start_step:
        print0(f'resumed {ckpt_path} at step {start_step} (epoch {start_step / steps_per_epoch:.2f})')

    ddp = DistributedDataParallel(vit, device_ids=[d.local_rank] if device.type == 'cuda' else None) if W > 1 else None
    step_model = ddp or vit
    sampler = data.EpochSampler(train, W, d.rank, args.seed, per_epoch=steps_per_epoch * args.accum * micro)
    # A private generator: the loader must not draw from the process's stream (mixup, drop path use it).
    loader = DataLoader(data.SeededSet(train, args.seed), batch_size=micro, sampler=sampler,
                        num_workers=args.workers, collate_fn=data.collate_skip, pin_memory=device.type == 'cuda',
                        persistent_workers=args.workers > 0, drop_last=True, generator=torch.Generator())
    val_loader = training.eval_loader(val, micro, args.workers, d)
    mix = batch_mixer(args, len(classes))
    log = training.JsonLogger(os.path.join(args.out, 'log.jsonl'))
    bar = tqdm(total=last_step, initial=start_step, disable=not d.is_main, desc='finetune', dynamic_ncols=True)
    vit.train()
    step, losses, result = start_step, [], None
    while step < last_step:
        epoch, done = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        sampler.skip = done * args.accum * micro
        batches = iter(loader)
        epoch_start, epoch_end = time.time(), min(last_step, (epoch + 1) * steps_per_epoch)
        while step < epoch_end:
            lr = training.lr_at(step, total_steps, warmup_steps, peak_lr, args.min_lr, WARMUP_LR)
            for group in optimizer.param_groups:
                group['lr'] = lr * group['lr_scale']
            stats = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, micro-batches
            for k in range(args.accum):
                batch = next(batches)
                if batch is None:
                    raise SystemExit(f'finetune.py: every image of a batch at step {step + 1} is unreadable')
                images, targets = mix(batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True))
                # DDP all-reduces the gradients during backward: only the last micro-batch needs it.
                sync = ddp.no_sync() if ddp is not None and k < args.accum - 1 else contextlib.nullcontext()
                with sync:
                    with training.autocast(dtype, device):
                        loss = soft_cross_entropy(step_model(images), targets)
                    scaler.scale(loss / args.accum).backward()
                stats += torch.stack([loss.detach().double(), stats.new_tensor(1.0)])
            if dist.is_initialized():
                dist.all_reduce(stats)
            loss = float(stats[0] / stats[1])
            if not math.isfinite(loss):
                raise SystemExit(f'finetune.py: non-finite loss ({loss}) at step {step + 1}: lower --lr, lengthen '
                                 f'--warmup-epochs or use --dtype bfloat16/float32; the last good checkpoint is in '
                                 f'{args.out}')
            scaler.step(optimizer)                  # no gradient clipping (Tab. 8)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss)
            bar.update()
            bar.set_postfix(loss=f'{loss:.3f}', lr=f'{lr:.2e}')
        # End of an epoch (or of --steps): evaluate every validation image once, save.
        result = training.evaluate(vit, val_loader, device, dtype)
        seconds = time.time() - epoch_start
        log.log(step=step, epoch=round(step / steps_per_epoch, 4), loss=sum(losses) / len(losses), lr=lr,
                top1=result['top1'], top5=result['top5'], seconds=round(seconds, 1))
        if d.is_main:
            tqdm.write(f'epoch {step / steps_per_epoch:.2f}/{args.epochs}: train loss {sum(losses) / len(losses):.4f}, '
                       f'val top-1 {result["top1"]:.2f}%, top-5 {result["top5"]:.2f}% ({result["count"]} images), '
                       f'{seconds:.0f} s')
        losses = []
        save(ckpt_path, vit, optimizer, scaler, step, args, d)
    bar.close()
    log.close()
    if result is None:  # resumed a finished run: nothing trained, still report the model
        result = training.evaluate(vit, val_loader, device, dtype)
    if d.is_main:
        export_classifier(args.out, vit, classes)
    print0(f'saved {args.out}/classifier.pt: loads into {timm_call(vit)} with strict=True')
    return finish(args, result, step / steps_per_epoch, time.time() - start_time, 'finetune')


def finish(args, result, epochs, seconds, method):
    training.record_result(args.results, method=method, checkpoint=args.checkpoint, data=args.data, model=args.model,
                           top1=result['top1'], top5=result['top5'], images=result['count'], epochs=round(epochs, 2),
                           seconds=round(seconds, 1))
    return dict(result, epochs=epochs, seconds=seconds, out=args.out)


if __name__ == '__main__':
    main()
