"""Fine-tune a pre-trained ViT for image classification with the paper's recipe.

Paper: Sec. 5.1 (average-pooled final patch tokens feed a softmax classifier), Tab. 1-3 (top-1 on
ImageNet-1k), App. D and Tab. 8 (the recipe: SIZES and PAPER below, no gradient clipping), App. A
(food101, stanford_cars, fgvc_aircraft).

    python finetune.py --checkpoint runs/pretrain_mapet/backbone.pt   # demo: ~65 s on 2 CPUs
    python finetune.py --checkpoint none                              # from scratch (Tab. 2 "ViT")
    torchrun --nproc_per_node=8 finetune.py --checkpoint runs/pretrain_mapet_base/backbone.pt \\
        --data /path/imagenet --accum 2  # ViT-B: 100 epochs, batch 1024 = 8 GPUs x 2 x 64

Writes to --out: ckpt.pt (every epoch; --resume continues it exactly), classifier.pt (timm's
layout; classifier.json: how it loads strictly), log.jsonl, args.json; a --results line.

Augmentations and drop path are drawn per sample as in pretrain.py; mixup / cutmix per micro-batch
from (--seed, step, rank, micro-batch): 2 processes == 1 and --accum hold up to mixup.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torchvision import transforms
from torchvision.transforms import v2
from tqdm import tqdm

import data
import model
import training
from training import print0

# Tab. 8 per size (lr: the peak at batch 1024); micro: the demo's
SIZES = {
    'micro': dict(lr=1.6e-2, epochs=4, layer_decay=0.75),
    'tiny': dict(lr=2.5e-4, epochs=300, layer_decay=1.0),
    'small': dict(lr=5e-3, epochs=200, layer_decay=0.65),
    'base': dict(lr=5e-4, epochs=100, layer_decay=0.65),
}
# Per --data: Tab. 8's defaults, or the demo's, unaugmented (2 epochs: 14% top-1, 10-12% augmented)
PAPER = dict(batch_size=1024, warmup_epochs=20, workers=training.default_workers(),
             **data.PAPER_CROPS, randaug=9, reprob=0.25, mixup=0.8, cutmix=1.0)
DEMO = dict(batch_size=128, warmup_epochs=0.5, workers=0, **data.DEMO_CROPS, randaug=0, reprob=0,
            mixup=0, cutmix=0)
REFERENCE_BATCH, WARMUP_LR, BETAS, EPS = 1024, 1e-6, (0.9, 0.999), 1e-8  # Tab. 8
POSITIVE = ('epochs', 'batch_size', 'accum', 'lr', 'steps', 'crop_scale', 'eval_crop',
            'layer_decay')
RANGES = [('crop_scale', 0, 1), ('eval_crop', 0, 1), ('layer_decay', 0, 1), ('reprob', 0, 1),
          ('smoothing', 0, 1), ('randaug', 0, 10), ('drop_path', 0, 0.99)] + [
    (key, 0, math.inf) for key in ('mixup', 'cutmix', 'randaug_std', 'warmup_epochs', 'min_lr',
                                   'weight_decay', 'workers')]


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0] + ' (Sec. 5.1, Tab. 1-3, 8)')

    def per_size(key):
        paper = ', '.join(f'{s} {v[key]:g}' for s, v in SIZES.items() if s != 'micro')
        return f'[Tab. 8: {paper}; micro, demo: {SIZES["micro"][key]:g}]'

    def default(key):
        return f'[paper: {PAPER[key]}; demo: {DEMO[key]}]'
    add = p.add_argument_group('model').add_argument
    add('--checkpoint', required=True, help='backbone.pt, ckpt.pt or none (Tab. 2)')
    add('--model', choices=list(model.MODEL_CONFIGS), help="[the checkpoint's; none: base, demo: "
        'micro]')
    add('--drop-path', type=float, default=0.1, help='stochastic depth [paper: 0.1]')
    add = p.add_argument_group('data').add_argument
    add('--data', default='demo', help='demo | ImageFolder root | '
        + ' | '.join(data.TORCHVISION_DATASETS) + ' [demo]')
    add('--data-root', default='data', help='of torchvision datasets [data]')
    add('--workers', type=int, help=f'per GPU {default("workers")}')
    add('--crop-scale', type=float, help=f'least crop area {default("crop_scale")}')
    add('--eval-crop', type=float, help=f'centre crop {default("eval_crop")}')
    add = p.add_argument_group('augmentation and regularisation (Tab. 8)').add_argument
    add('--randaug', type=float, help=f'RandAugment M, 0 = off {default("randaug")}')
    add('--randaug-std', type=float, default=0.5, help='its std [paper: 0.5]')
    add('--reprob', type=float, help=f'random erasing probability {default("reprob")}')
    add('--mixup', type=float, help=f'Beta alpha, 0 = off {default("mixup")}')
    add('--cutmix', type=float, help=f'Beta alpha, 0 = off {default("cutmix")}')
    add('--smoothing', type=float, default=0.1, help='label smoothing [paper: 0.1]')
    add = p.add_argument_group('optimisation (Tab. 8)').add_argument
    add('--epochs', type=int, help=per_size('epochs'))
    add('--batch-size', type=int, help=f'global {default("batch_size")}')
    add('--accum', type=int, default=1, help='micro-batches per step [1]')
    add('--lr', type=float, help=f'peak at batch 1024, scaled {per_size("lr")}')
    add('--layer-decay', type=float, help=per_size('layer_decay'))
    add('--min-lr', type=float, default=1e-6, help='at the end of the cosine [1e-6]')
    add('--warmup-epochs', type=float, help=f'linear {default("warmup_epochs")}')
    add('--weight-decay', type=float, default=0.05, help='AdamW [paper: 0.05]')
    add('--dtype', default='auto', choices=('auto', *training.DTYPES),
        help='auto: bf16 on Ampere+, fp16 on older GPUs, fp32 on CPU')
    add = p.add_argument_group('run').add_argument
    add('--out', help='[runs/finetune_<run>[_<dataset>]]')
    add('--resume', action='store_true', help='continue the run in --out, exactly')
    add('--eval-only', action='store_true', help='evaluate a ckpt.pt of finetune.py')
    add('--seed', type=int, default=0, help='init, data order, draws [0]')
    add('--steps', type=int, help='stop at this step; the schedule spans --epochs')
    add('--results', default=os.path.join('runs', 'results.jsonl'), help='[%(default)s]')
    add('--device', help='cuda | cpu | cuda:N [cuda if available]')
    return p


def resolve_args(args):
    """The defaults --data selects (the size's: resolve_size), checked."""
    for key, value in (DEMO if args.data == 'demo' else PAPER).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    training.check_args(args, POSITIVE, RANGES)
    if args.eval_only and (args.resume or args.checkpoint == 'none'):
        raise ValueError('--eval-only evaluates a finetune.py ckpt.pt (--checkpoint); it takes '
                         'neither --resume nor --checkpoint none')
    if args.out is None:
        source = 'scratch' if args.checkpoint == 'none' else os.path.basename(
            os.path.dirname(os.path.abspath(args.checkpoint))).removeprefix('pretrain_')
        dataset = '' if args.data == 'demo' else '_' + os.path.basename(os.path.normpath(args.data))
        args.out = os.path.join('runs', f'finetune_{source}{dataset}')
    return args


def resolve_size(args, size):
    """Tab. 8's defaults for `size` (--data demo: the demo's epochs) and its line."""
    args.model, demo = size, args.data == 'demo' and size != 'micro'
    defaults = dict(SIZES[size], epochs=SIZES['micro' if demo else size]['epochs'])
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    where = "the demo's" if size == 'micro' else f'Tab. 8 for ViT-{size[0].upper()}'
    return (f'recipe: {where}: lr {args.lr:g}, layer decay {args.layer_decay:g}, {args.epochs} '
            'epochs' + (" (the demo's)" if demo else ''))


# Training data (Tab. 8): augmentations, mixup / cutmix.

class RandAugment(transforms.RandAugment):
    """Two ops on timm's scale ('rand-m9-mstd0.5', Tab. 8's "9/0.5"): M of 10, redrawn per op from
    N(M, std); torchvision reads self.magnitude once per op, so it is a property."""

    def __init__(self, magnitude, std):
        fill = [round(255 * m) for m in data.IMAGENET_MEAN]
        super().__init__(num_ops=2, magnitude=magnitude, num_magnitude_bins=101,
                         interpolation=transforms.InterpolationMode.BICUBIC, fill=fill)
        self.std = std

    @property
    def magnitude(self):
        m = self.mean if self.std == 0 else float(torch.normal(self.mean, self.std, ()))
        return round(10 * min(10.0, max(0.0, m)))  # bin 0..100

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
        *([transforms.RandomErasing(args.reprob, value='random')] if args.reprob > 0 else []),
    ])


def batch_mixer(args, num_classes):
    """(images, labels) -> (images, smoothed targets (B, C)); mixup or cutmix at even odds."""
    mixes = [mix(alpha=alpha, num_classes=num_classes)
             for mix, alpha in ((v2.MixUp, args.mixup), (v2.CutMix, args.cutmix)) if alpha > 0]
    mix = v2.RandomChoice(mixes) if mixes else (
        lambda images, labels: (images, F.one_hot(labels, num_classes)))

    def apply(images, labels):
        images, targets = mix(images, labels)
        return images, targets.float() * (1 - args.smoothing) + args.smoothing / num_classes
    return apply


# The model: the pre-trained backbone, a new fc_norm and head (Sec. 5.1), layer decay.

def build_classifier(args, num_classes):
    if args.checkpoint == 'none':
        recipe = resolve_size(args, args.model or ('micro' if args.data == 'demo' else 'base'))
        vit = model.create_model(args.model, num_classes=num_classes, drop_path_rate=args.drop_path)
        return vit, f'--checkpoint none: a random {args.model} ViT (Tab. 2, "ViT"); {recipe}'
    if args.checkpoint.endswith('classifier.pt'):
        raise ValueError(f'{args.checkpoint} is an exported timm-layout state dict; pass the '
                         'ckpt.pt beside it')
    expect = args.model and {k: model.MODEL_CONFIGS[args.model][k] for k in training.SIZE_KEYS}
    vit, report = training.load_backbone(args.checkpoint, num_classes, args.drop_path, expect)
    size = training.size_name(vit.config)
    if size not in SIZES:
        shape = ', '.join(f'{k} {vit.config[k]}' for k in training.SIZE_KEYS)
        raise ValueError(f'{args.checkpoint} holds a ViT of no known size ({shape}): finetune.py '
                         f'runs the sizes {", ".join(SIZES)}')
    return vit, f'{report}; {resolve_size(args, size)}'


def layer_decay_groups(vit, weight_decay, layer_decay):
    """BEiT's: lr scale decay ** (depth + 1 - layer); layer 0 the embeddings, i + 1 block i."""
    depth = len(vit.blocks)

    def layer(name):
        if name.startswith(('patch_embed.', 'cls_token', 'pos_embed')):
            return 0
        return int(name.split('.')[1]) + 1 if name.startswith('blocks.') else depth + 1
    return training.param_groups(vit, weight_decay, lambda n: layer_decay ** (depth + 1 - layer(n)))


def timm_call(vit):
    c, size = vit.config, training.size_name(vit.config)
    common = f"global_pool='avg', init_values={c['layer_scale']}, num_classes={c['num_classes']}"
    if size in ('tiny', 'small', 'base'):
        return f"timm.create_model('vit_{size}_patch{c['patch_size']}_{c['img_size']}', {common})"
    shape = ', '.join(f'{k}={c[k]}' for k in training.SIZE_KEYS)
    return f'timm.models.vision_transformer.VisionTransformer({shape}, {common})'


def export_classifier(out, vit, classes):
    """classifier.pt: the state dict in timm's names; classifier.json: how it loads."""
    training.save_checkpoint(os.path.join(out, 'classifier.pt'), vit.state_dict())
    with open(os.path.join(out, 'classifier.json'), 'w') as f:
        json.dump(dict(timm=timm_call(vit), strict=True, config=vit.config, classes=list(classes),
                       mean=data.IMAGENET_MEAN, std=data.IMAGENET_STD), f, indent=1)


def build(args, d):
    """(ckpt or None, classifier, classes, val set, train set or None for --eval-only)"""
    training.seed_everything(args.seed, d.rank)
    classes = data.build_dataset(args.data, 'val', args.data_root).classes
    vit, report = build_classifier(args, len(classes))
    ckpt = None if args.eval_only else training.resume_or_start(
        args, os.path.join(args.out, 'ckpt.pt'), ('checkpoint', 'model', 'data', 'batch_size'))
    if args.eval_only and 'newly initialised' in report:
        raise ValueError(f'{args.checkpoint} holds no classifier for the {len(classes)} classes of '
                         f'{args.data}: --eval-only needs a finetune.py ckpt.pt')
    img_size = vit.patch_embed.img_size
    val = data.build_dataset(args.data, 'val', args.data_root,
                             data.eval_transform(img_size, args.eval_crop))
    train = None if args.eval_only else data.build_dataset(
        args.data, 'train', args.data_root, train_transform(img_size, args))
    if train is not None and len(train) < args.batch_size:
        raise ValueError(f'{args.data} has {len(train)} training images, fewer than one '
                         f'--batch-size {args.batch_size}')
    print0(report)
    if ckpt is not None:
        vit.load_state_dict(ckpt['model'])
    return ckpt, vit.to(d.device), classes, val, train


def main(argv=None):
    return training.run_command('finetune.py', get_args_parser(), resolve_args, run, argv)


def run(args, d):
    device, out, start_time = d.device, args.out, time.time()
    try:
        ckpt, vit, classes, val, train = build(args, d)
    except ValueError as e:
        raise SystemExit(f'finetune.py: {e}') from None
    dtype = training.resolve_dtype(args.dtype, device)
    micro = args.batch_size // (d.world_size * args.accum)
    val_loader = training.eval_loader(val, micro, args.workers, d)
    if args.eval_only:
        result = training.evaluate(vit, val_loader, device, dtype)
        return finish(args, result, 0, time.time() - start_time, 'eval')
    s, batch_line = training.plan(args, len(train), d, REFERENCE_BATCH, WARMUP_LR)
    start = ckpt['step'] if ckpt else 0
    if start >= s.last:
        top1, top5 = ckpt['result']['top1'], ckpt['result']['top5']
        print0(f'{out}/ckpt.pt is a finished run (step {start} of {s.last}): top-1 {top1:.2f}%, '
               f'top-5 {top5:.2f}%; nothing written (raise --steps or --epochs)')
        return dict(ckpt['result'], epochs=start / s.steps_per_epoch, seconds=0.0, out=out)
    training.start_run(args, out, d)
    optimizer = torch.optim.AdamW(layer_decay_groups(vit, args.weight_decay, args.layer_decay),
                                  lr=0.0, betas=BETAS, eps=EPS, fused=device.type == 'cuda')
    scaler = training.grad_scaler(dtype, device)
    if ckpt is not None:
        optimizer.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
    print0(f'fine-tuning a {args.model} ViT on {args.data}: {len(train)} training / {len(val)} '
           f'validation images, {len(classes)} classes, {vit.patch_embed.img_size} px')
    print0(f'{batch_line}; layer decay {args.layer_decay:g}; {str(dtype).replace("torch.", "")}')
    if start:
        print0(f'resumed {out}/ckpt.pt at step {start} (epoch {start / s.steps_per_epoch:.2f})')
    ddp = training.wrap_ddp(vit, d)
    loader = training.train_loader(data.KeyedSet(train, args.seed), d, args.seed, s, args.accum,
                                   args.workers)
    mix, epoch = batch_mixer(args, len(classes)), training.Meter()
    bar = tqdm(total=s.last, initial=start, disable=not d.is_main, desc='finetune')
    vit.train()
    for step, micro_batches in training.steps(loader, start, s, args.accum, ddp, 'finetune.py'):
        lr = training.set_lr(optimizer, s, step)
        stats = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, micro-batches
        for k, (epochs, index, images, labels) in enumerate(micro_batches):
            drop = data.per_sample(vit.draw_drop, epochs, index, args.seed, 2).to(device)
            with data.keyed(args.seed, step, d.rank, k, 3):
                images, targets = mix(images.to(device, non_blocking=True),
                                      labels.to(device, non_blocking=True))
            with training.autocast(dtype, device):
                logits = (ddp or vit)(images, drop_draws=drop)  # (B, C)
                loss = torch.sum(-targets * logits.float().log_softmax(-1), -1).mean()
            scaler.scale(loss / args.accum).backward()
            stats += torch.stack([loss.detach().double(), stats.new_tensor(1.0)])
        loss, _, grad_norm, _ = training.finish_step(  # clip 0: none (Tab. 8)
            stats, optimizer, scaler, 0, step, 'finetune.py', f'{out}/ckpt.pt')
        done = step + 1
        epoch.add(loss=loss, grad_norm=grad_norm)
        bar.update()
        bar.set_postfix(loss=f'{loss:.3f}', lr=f'{lr:.2e}')
        if done % s.steps_per_epoch and done != s.last:
            continue
        # An epoch's (or --steps') end: evaluate, save.
        result = training.evaluate(vit, val_loader, device, dtype)
        mean, n, seconds = epoch.read()
        training.log_line(f'{out}/log.jsonl', step=done, epoch=round(done / s.steps_per_epoch, 4),
                          **mean, lr=lr, top1=result['top1'], top5=result['top5'],
                          seconds=round(seconds, 1))
        since = '' if n == s.steps_per_epoch or done == s.last else f' ({n} steps since resume)'
        if d.is_main:
            tqdm.write(f'epoch {done / s.steps_per_epoch:.2f}/{args.epochs}: train loss '
                       f'{mean["loss"]:.4f}{since}, val top-1 {result["top1"]:.2f}%, top-5 '
                       f'{result["top5"]:.2f}% ({result["count"]} images), {seconds:.0f} s')
            training.save_checkpoint(f'{out}/ckpt.pt', dict(
                model=vit.state_dict(), config=dict(vit.config), optimizer=optimizer.state_dict(),
                scaler=scaler.state_dict(), step=done, result=result, args=vars(args)))
    bar.close()
    if d.is_main:
        export_classifier(out, vit, classes)
    print0(f'saved {out}/classifier.pt: loads into {timm_call(vit)} with strict=True')
    return finish(args, result, s.last / s.steps_per_epoch, time.time() - start_time, 'finetune')


def finish(args, result, epochs, seconds, method):
    training.record_result(args.results, method=method, checkpoint=args.checkpoint, data=args.data,
                           model=args.model, seed=args.seed, top1=result['top1'],
                           top5=result['top5'], images=result['count'], epochs=round(epochs, 2),
                           seconds=round(seconds, 1))
    return dict(result, epochs=epochs, seconds=seconds, out=args.out)


if __name__ == '__main__':
    main()
