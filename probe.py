"""Linear probe of a frozen backbone (Sec. 5.1, App. D; Tab. 1, 2, 5) and tokens-only
classification (Sec. 5.3, Tab. 4: how the tokenizers are compared).

    python probe.py --checkpoint runs/pretrain_mapet/backbone.pt    # demo, cached, ~16 s
    python probe.py --checkpoint none                                # baseline: random backbone
    python probe.py --checkpoint runs/pretrain_mapet/backbone.pt --no-cached --epochs 5
    python probe.py --method tokens-mlp                 # demo tokens, made first if missing
    torchrun --nproc_per_node=8 probe.py --checkpoint runs/pretrain_mapet_base/backbone.pt \\
        --data /path/imagenet                           # or --data food101 (Tab. 5)
    torchrun --nproc_per_node=8 probe.py --method tokens-vit --data /path/imagenet \\
        --tokens tokens/in1k_rn50x64 --val-tokens tokens/in1k_rn50x64_val

linear: a Linear on frozen features of random crops and flips (App. D), or with --cached of
centre crops, extracted once. tokens-*: the tokens alone.
"""
import argparse
import math
import os
import shlex
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from torchvision import transforms
from tqdm import tqdm

import data
import model
import tokenizer
import training
from training import print0

# The paper's are lost: linear's lr is BEiT's linear probe's (App. D follows it), the rest common.
RECIPES = {'linear': {'lr': 4e-3, 'weight_decay': 1e-4},
           'tokens-mlp': {'lr': 2e-3, 'weight_decay': 0.05, 'embed_dim': 192, 'hidden': 768},
           'tokens-vit': {'lr': 1e-3, 'weight_decay': 0.05}}
# The demo's micro ViT separates the shapes weakly: lr 1.6 matches scikit-learn's logistic
# regression. Its HOG tokens tell shape (tokens-mlp 42.8 %), pixel tokens colour (12.2 %).
DEMO_RECIPES = {'linear': {'lr': 1.6}, 'tokens-mlp': {'epochs': 20}, 'tokens-vit': {'epochs': 3}}
PAPER = {'epochs': 50, 'batch_size': 1024, 'warmup_epochs': 5, 'cached': False,
         'workers': training.default_workers(), **data.PAPER_CROPS}
DEMO = {'epochs': 50, 'batch_size': 256, 'warmup_epochs': 1, 'workers': 0, 'cached': True,
        'tokens': data.DEMO_TOKENS, 'val_tokens': data.DEMO_TOKENS + '_val', **data.DEMO_CROPS}
OWN = {'linear': {'checkpoint', 'cached', 'crop_scale', 'eval_crop', 'model'},  # their flags
       'tokens-mlp': {'tokens', 'val_tokens', 'embed_dim', 'hidden'},
       'tokens-vit': {'tokens', 'val_tokens', 'model'}}


def get_args_parser():
    p = argparse.ArgumentParser('probe.py', description=__doc__.split('\n\n')[0])
    add = p.add_argument_group('what to probe').add_argument
    add('--method', default='linear', choices=list(OWN), help='[linear]')
    add('--checkpoint', help='linear: backbone.pt or ckpt.pt of pretrain.py; none (a random '
        'ViT) or pixels (no backbone): the baselines')
    add('--model', choices=list(model.MODEL_CONFIGS),
        help="[the checkpoint's; none: base; tokens-vit: tiny; demo: micro]")
    add('--cached', action=argparse.BooleanOptionalAction,
        help='linear: train on features extracted once [paper: no; demo: yes]')
    add('--tokens', help='tokens-*: train split token dir [demo: runs/tokens/demo_hog]')
    add('--val-tokens', help='tokens-*: of the val split, made with --codebook TOKENS')
    add('--embed-dim', type=int, help='tokens-mlp [192]')
    add('--hidden', type=int, help='tokens-mlp [768]')
    add = p.add_argument_group('data').add_argument
    add('--data', default='demo', help='demo | ImageFolder root (train/, val/) | '
        + ' | '.join(data.TORCHVISION_DATASETS) + ' [demo]')
    add('--data-root', default='data', help='of torchvision datasets [data]')
    add('--workers', type=int, help='per GPU [min(10, CPUs); demo: 0]')
    add('--crop-scale', type=float, help='linear: least crop area [0.08; demo: 0.35]')
    add('--eval-crop', type=float, help='linear: centre crop [0.875; demo: 1]')
    add = p.add_argument_group('optimisation (App. D: AdamW, cosine)').add_argument
    add('--epochs', type=int, help='[50; demo: tokens-mlp 20, tokens-vit 3]')
    add('--batch-size', type=int, help='global [1024; demo: 256]')
    add('--lr', type=float, help='at batch 1024 [linear 4e-3 (demo: 1.6), tokens-mlp '
        '2e-3, tokens-vit 1e-3]')
    add('--weight-decay', type=float, help='[linear 1e-4, tokens-* 0.05]')
    add('--warmup-epochs', type=float, help='from lr 1e-6 [5; demo: 1]')
    add('--dtype', default='auto', choices=('auto', *training.DTYPES),
        help='[auto: bf16 on Ampere+, fp16 on older GPUs, fp32 on CPU]')
    add = p.add_argument_group('run').add_argument
    add('--device', help='cuda | cpu | cuda:N [cuda if available]')
    add('--seed', type=int, default=0, help='[0]')
    add('--results', default='runs/results.jsonl', help='[%(default)s]')
    return p


def resolve_args(args):
    own, demo, specific = OWN[args.method], args.data == 'demo', set().union(*OWN.values())
    for key in sorted(specific - own):
        if getattr(args, key) is not None:
            raise ValueError(f'--{key.replace("_", "-")} is not used by --method {args.method}')
    if args.method == 'linear' and args.checkpoint is None:
        raise ValueError('--method linear needs --checkpoint: backbone.pt of pretrain.py, or none')
    if args.checkpoint == 'pixels' and args.lr is None:
        args.lr = 0.1  # 3072 raw inputs: at lr 1.6 the loss reaches ~100; 0.01-0.1 agree
    defaults = {**(DEMO if demo else PAPER), **RECIPES[args.method],
                **(DEMO_RECIPES[args.method] if demo else {})}
    for key, value in defaults.items():
        if (key in own or key not in specific) and getattr(args, key) is None:
            setattr(args, key, value)
    baseline = args.checkpoint in ('none', 'pixels')
    if args.model is None and (baseline or args.method == 'tokens-vit'):
        args.model = 'micro' if demo else 'tiny' if args.method == 'tokens-vit' else 'base'
    if args.method != 'linear' and None in (args.tokens, args.val_tokens):
        raise ValueError(f'--method {args.method} needs --tokens and --val-tokens: '
                         + tokens_fix(args, 'train', 'val'))
    training.check_args(args, ('epochs', 'batch_size', 'lr', 'embed_dim', 'hidden', 'crop_scale',
                               'eval_crop'), [(k, 0, 1) for k in ('crop_scale', 'eval_crop')]
                        + [(k, 0, math.inf) for k in ('weight_decay', 'warmup_epochs', 'workers')])
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if args.batch_size % world:
        raise ValueError(f'--batch-size {args.batch_size} does not divide among {world} processes: '
                         f'pass --batch-size {max(world, args.batch_size // world * world)}')
    return args


def tokens_fix(args, *splits):
    """The tokenizer.py commands that make this run's token dirs of `splits`."""
    train = args.tokens or os.path.join('tokens', os.path.basename(os.path.normpath(args.data)))
    val = args.val_tokens
    if val is None or os.path.realpath(val) == os.path.realpath(train):
        val = os.path.normpath(train) + '_val'
    root = ['--data-root', args.data_root] if args.data_root != 'data' else []
    outs = {'train': ['--out', train], 'val': ['--codebook', train, '--out', val]}
    fix = ' and '.join('run `' + shlex.join(['python', 'tokenizer.py', '--data', args.data, *root,
                                             '--split', s, *outs[s]]) + '`' for s in splits)
    flags = [f'--{flag} {shlex.quote(path)}' for flag, path, given in (
        ('tokens', train, args.tokens), ('val-tokens', val, args.val_tokens)) if path != given]
    return f'{fix}, then pass {" ".join(flags)}' if flags else fix


# The probe models: App. D's linear probe, Tab. 4's classifiers of the tokens.


class LinearProbe(nn.Module):
    """The backbone frozen, in eval mode (no drop path) (Sec. 5.1)."""

    def __init__(self, backbone, num_classes):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def train(self, mode=True):
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def features(self, images):
        return self.backbone.pool(self.backbone.forward_features(images))  # (B, D)

    def forward(self, images):
        return self.head(self.features(images))


class Pixels(nn.Module):
    """--checkpoint pixels, the baseline of no backbone: the image's normalised pixels."""

    def __init__(self, size):
        super().__init__()
        self.config, self.embed_dim = {'img_size': size}, 3 * size * size  # as a ViT's

    def forward_features(self, images):
        return images.flatten(1)

    def pool(self, features):
        return features


class TokenMLP(nn.Module):
    """Tab. 4's MLP: the tokens' embeddings, each through a hidden layer, averaged."""

    def __init__(self, vocab_size, num_classes, embed_dim, hidden):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.fc, self.head = nn.Linear(embed_dim, hidden), nn.Linear(hidden, num_classes)
        self.apply(model.init_weights)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, tokens):  # (B, N) int32 -> (B, classes)
        return self.head(F.relu(self.fc(self.embed(tokens))).mean(dim=1))


def train_loader(dataset, micro, args, d, seeded=False, shard=True):
    """Shuffled by (seed, epoch); seeded: an image's crop is drawn from (seed, epoch, index)."""
    world, rank = (d.world_size, d.rank) if shard else (1, 0)
    if seeded:
        sampler = data.EpochSampler(dataset, world, rank, args.seed, len(dataset) // world)
        dataset = data.SeededSet(dataset, args.seed)
    else:
        sampler = DistributedSampler(dataset, world, rank, seed=args.seed, drop_last=True)
    return DataLoader(dataset, micro, sampler=sampler, num_workers=args.workers, drop_last=True,
                      collate_fn=data.collate_skip, pin_memory=d.device.type == 'cuda',
                      persistent_workers=args.workers > 0, generator=torch.Generator())


@torch.no_grad()
def extract(probe, dataset, micro, args, d, dtype):
    """(features (n, D), labels (n,)) of this rank's shard."""
    features, labels = [], []
    for batch in tqdm(training.eval_loader(dataset, micro, args.workers, d), disable=not d.is_main,
                      desc='features', leave=False, dynamic_ncols=True):
        if batch is not None:
            with training.autocast(dtype, d.device):
                features.append(probe.features(batch[0].to(d.device)).float().cpu())
            labels.append(batch[1])
    return torch.cat(features), torch.cat(labels)


def linear_probe(args, d, micro, dtype):
    """App. D: (classifier, train loader, validation loader)."""
    if args.checkpoint == 'none':
        with torch.random.fork_rng(devices=[]):  # the same random backbone on every rank
            torch.manual_seed(args.seed)
            backbone = model.create_model(args.model, num_classes=0, drop_path_rate=0.0)
        report = f'--checkpoint none: a randomly initialised {args.model} ViT, the baseline'
    elif args.checkpoint == 'pixels':
        backbone = Pixels(model.MODEL_CONFIGS[args.model]['img_size'])
        report = '--checkpoint pixels: logistic regression on the raw images'
    else:
        config = model.MODEL_CONFIGS.get(args.model)
        backbone, report = training.load_backbone(args.checkpoint, 0, 0.0, config and {
            k: config[k] for k in training.SIZE_KEYS})
        args.model = training.size_name(backbone.config)
    print0(report)
    size = backbone.config['img_size']
    centre = data.eval_transform(size, args.eval_crop)
    val = data.build_dataset(args.data, 'val', args.data_root, centre)
    probe = LinearProbe(backbone, len(val.classes)).to(d.device)
    if not args.cached:  # App. D
        train = data.build_dataset(args.data, 'train', args.data_root, transforms.Compose([
            transforms.RandomResizedCrop(size, scale=(args.crop_scale, 1.0),
                                         interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)]))
        return (probe, train_loader(train, micro, args, d, seeded=True),
                training.eval_loader(val, micro, args.workers, d))
    print0('--cached: features of centre crops, extracted once (reported as linear-cached)')
    train = data.build_dataset(args.data, 'train', args.data_root, centre)
    features = extract(probe, train, micro, args, d, dtype)  # this rank's shard already
    shortest = torch.tensor(len(features[1]), device=d.device)  # as many steps on every rank
    if dist.is_initialized():
        dist.all_reduce(shortest, op=dist.ReduceOp.MIN)
    train = TensorDataset(*(t[:shortest] for t in features))
    val = TensorDataset(*extract(probe, val, micro, args, d, dtype))  # evaluate sums the counts
    return probe.head, train_loader(train, micro, args, d, shard=False), DataLoader(val, micro)


def token_set(args, split, token_dir):
    """(tokens (n, N) and labels of the readable images, K, G, classes)."""
    dataset = data.build_dataset(args.data, split, args.data_root)
    path = os.path.join(token_dir, 'meta.json')
    meta = tokenizer.read_meta(token_dir) if os.path.isfile(path) else {}
    theirs = [meta.get(k) for k in ('dataset', 'split', 'num_images')]
    if theirs != [data.dataset_id(args.data), split, len(dataset)]:
        found = (f'{token_dir} holds tokens of {theirs[0]} {theirs[1]} ({theirs[2]} images), not '
                 f'of {args.data} {split} ({len(dataset)})') if meta else f'no token file {path}'
        raise ValueError(f'{found}: {tokens_fix(args, split)}')
    tokens, meta = data.load_tokens(token_dir, args.data, split, len(dataset), meta['grid'])
    # no image decoded: ImageFolder, CIFAR; demo, STL10; Food101, Aircraft; Cars
    labels = [y for _, y in dataset._samples] if hasattr(dataset, '_samples') else next(
        getattr(dataset, a) for a in ('targets', 'labels', '_labels') if hasattr(dataset, a))
    keep = np.setdiff1d(np.arange(len(dataset)), meta.get('skipped', []))  # unreadable images
    pairs = TensorDataset(torch.from_numpy(tokens[keep].astype(np.int32)).flatten(1),
                          torch.as_tensor(np.asarray(labels)[keep]))
    return pairs, meta['vocab_size'], meta['grid'], dataset.classes


def tokens_only(args, d, micro):
    """Tab. 4: linear_probe's three for a classifier of the tokens."""
    if args.data == 'demo':
        tokenizer.ensure_demo_tokens(args.tokens, 'train', d.device)
        tokenizer.ensure_demo_tokens(args.val_tokens, 'val', d.device, codebook=args.tokens)
    train, vocab, grid, classes = token_set(args, 'train', args.tokens)
    val = token_set(args, 'val', args.val_tokens)[0]
    if not np.array_equal(*(np.load(os.path.join(t, 'codebook.npy'))
                            for t in (args.tokens, args.val_tokens))):
        raise ValueError(f'{args.val_tokens} was not made with the codebook of {args.tokens}: '
                         + tokens_fix(args, 'val'))
    if args.method == 'tokens-mlp':
        net = TokenMLP(vocab, len(classes), args.embed_dim, args.hidden)
    else:  # Tab. 4's ViT-T on the G x G tokens, embedded by id: (B, N) -> (B, N, D)
        net = model.create_model(args.model, img_size=grid, patch_size=1, num_classes=len(classes))
        net.patch_embed = nn.Embedding(vocab, net.embed_dim)
        nn.init.normal_(net.patch_embed.weight, std=0.02)
    print0(f'{args.method}: {grid}x{grid} tokens of {vocab}, {len(classes)} classes')
    return (net.to(d.device), train_loader(train, micro, args, d),
            training.eval_loader(val, micro, args.workers, d))


# The loop of every method: AdamW, linear warmup, cosine (App. D); one result line.


def main(argv=None):
    return training.run_command('probe.py', get_args_parser(), resolve_args, run, argv)


def run(args, d):
    start, W = time.time(), d.world_size
    training.print_run(args, d)
    training.seed_everything(args.seed, d.rank)
    dtype, micro = training.resolve_dtype(args.dtype, d.device), args.batch_size // W
    method = 'linear-cached' if args.cached else args.method
    try:
        classifier, loader, val_loader = linear_probe(args, d, micro, dtype) \
            if args.method == 'linear' else tokens_only(args, d, micro)
    except ValueError as e:
        raise SystemExit(f'probe.py: {e}') from None
    steps, n_train = len(loader), len(loader.sampler) * W  # whole global batches
    if steps == 0:
        raise SystemExit(f'probe.py: {n_train} training images, fewer than one --batch-size '
                         f'{args.batch_size}: pass --batch-size {n_train // W * W or W}')
    total, warmup = args.epochs * steps, round(args.warmup_epochs * steps)
    peak_lr = args.lr * args.batch_size / 1024
    print0(f'{method} on {args.data}: {n_train} training images, batch {args.batch_size} = {W} '
           f'x {micro}; lr {args.lr:g} x {args.batch_size}/1024 = {peak_lr:.3g}; {steps} steps '
           f'x {args.epochs} epochs')
    optimizer = torch.optim.AdamW(training.param_groups(classifier, args.weight_decay), lr=0.0)
    net = (training.wrap_ddp(classifier, d) or classifier).train()
    bar = tqdm(total=total, disable=not d.is_main, desc=method, dynamic_ncols=True)
    for epoch in range(args.epochs):
        losses = []
        loader.sampler.set_epoch(epoch)
        for step, batch in enumerate(loader, epoch * steps):
            if batch is None:
                raise SystemExit(f'probe.py: every image of a batch in epoch {epoch + 1} is '
                                 'unreadable: check the dataset files')
            lr = training.lr_at(step, total, warmup, peak_lr, 1e-6, 1e-6)  # min lr, warmup lr
            for group in optimizer.param_groups:
                group['lr'] = lr
            with training.autocast(dtype, d.device):
                logits = net(batch[0].to(d.device))  # (B, classes)
            loss = F.cross_entropy(logits.float(), batch[1].to(d.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
            bar.update()
        loss = torch.stack(losses).mean() / W
        if dist.is_initialized():
            dist.all_reduce(loss)  # every rank stops alike
        if not torch.isfinite(loss):
            raise SystemExit(f'probe.py: non-finite loss in epoch {epoch + 1}: pass an --lr '
                             f'below {args.lr:g}')
        bar.set_postfix(loss=f'{float(loss):.3f}', lr=f'{lr:.2e}')
    bar.close()
    result = training.evaluate(classifier, val_loader, d.device, dtype)
    seconds = time.time() - start
    training.record_result(
        args.results, method=method, checkpoint=args.checkpoint or args.tokens, data=args.data,
        model=args.model, top1=result['top1'], top5=result['top5'], images=result['count'],
        epochs=args.epochs, seed=args.seed, seconds=round(seconds, 1))
    return dict(result, method=method, epochs=args.epochs, seconds=seconds)


if __name__ == '__main__':
    main()
