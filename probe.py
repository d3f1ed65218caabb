"""Linear probing of a frozen backbone, and tokens-only classification of the visual tokens.

Paper: Sec. 5.1 "Image classification setup" and App. D "Hyperparameters for Linear Probe"
(BEiT's protocol: a linear classifier on the average-pooled final-layer features of the frozen
pre-trained backbone, 50 epochs, batch 1024, AdamW, cosine decay; random resized crops and flips
for training, centre crops for evaluation) for Tab. 1-2 (ImageNet-1k) and Tab. 5 (App. A:
Stanford Cars, Food-101, FGVC-Aircraft); Sec. 5.3 and Tab. 4 (an image classified from its visual
tokens alone, through learned token embeddings and an MLP head or a ViT-T: how the tokenizers
are compared).

    python probe.py --checkpoint runs/pretrain_mapet/backbone.pt   # demo: cached linear probe, ~40 s
    python probe.py --checkpoint none                               # the same on a random backbone
    python probe.py --checkpoint runs/pretrain_mapet/backbone.pt --no-cached --epochs 5   # the paper's protocol
    python probe.py --method tokens-mlp                             # demo tokens, made first if missing
    torchrun --nproc_per_node=8 probe.py --checkpoint runs/pretrain_mapet_base/backbone.pt --data /path/imagenet
    torchrun --nproc_per_node=8 probe.py --checkpoint runs/pretrain_mapet_base/backbone.pt --data food101
    torchrun --nproc_per_node=8 probe.py --method tokens-vit --data /path/imagenet \\
        --tokens tokens/in1k_rn50x64 --val-tokens tokens/in1k_rn50x64_val

Methods (--method):
    linear      frozen backbone -> mean of the final patch tokens -> fc_norm (a LayerNorm at its
                identity initialisation: pre-training never trains it) -> a trained Linear.
                --cached: extract the features once, from un-augmented centre crops, and train
                the Linear on them: a fast approximation for course-sized work, reported as
                method linear-cached.
    tokens-mlp  Tab. 4's MLP: token embedding -> Linear -> ReLU -> mean over the G x G tokens -> Linear.
    tokens-vit  Tab. 4's ViT-T over the G x G token grid (the patch embedding of model.py's ViT
                replaced by a token embedding).

Each run prints one `result:` line (method, checkpoint or token dir, dataset, top-1, top-5,
epochs, wall time) and appends it to --results (JSON lines). Validation counts every image
exactly once on any number of processes (training.evaluate). Nothing else is written.
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset
from torchvision import transforms
from tqdm import tqdm

import data
import model
import tokenizer
import training
from training import print0

METHODS = ('linear', 'tokens-mlp', 'tokens-vit')
# Peak lr at batch 1024 (scaled linearly) and weight decay per method. The paper's values did not
# survive in its text (App. D, Tab. 4): linear takes the lr of BEiT's linear-probe command, which
# App. D follows; the rest are common AdamW settings.
RECIPES = {'linear': dict(lr=4e-3, weight_decay=1e-4), 'tokens-mlp': dict(lr=2e-3, weight_decay=0.05),
           'tokens-vit': dict(lr=1e-3, weight_decay=0.05)}
# What the demo changes per method: its micro ViT's features separate the shapes weakly, so the
# linear head needs large weights (a 0.4 peak lr at batch 256 reaches what scikit-learn's
# logistic regression reaches on the same features); the tokens-only runs are shortened to about
# two CPU minutes each: the demo's pixel tokens describe colour more than shape, and 50 epochs of
# the MLP reach only 13.8% (chance 10%).
DEMO_RECIPES = {'linear': dict(lr=1.6), 'tokens-mlp': dict(epochs=20), 'tokens-vit': dict(epochs=3)}
# The defaults that --data selects: the paper's (App. D; crops as in finetune.py), or the demo's.
PAPER = dict(epochs=50, batch_size=1024, warmup_epochs=5, workers=10, cached=False, tokens=None, val_tokens=None,
             **data.PAPER_CROPS)
DEMO = dict(epochs=50, batch_size=256, warmup_epochs=1, workers=0, cached=True, tokens=data.DEMO_TOKENS,
            val_tokens=data.DEMO_TOKENS + '_val', **data.DEMO_CROPS)
TOKEN_MLP = dict(embed_dim=192, hidden=768)   # Tab. 4: the sizes are lost from the paper's text
OPTIONAL = {'checkpoint', 'cached', 'crop_scale', 'eval_crop', 'tokens', 'val_tokens', 'model', 'embed_dim', 'hidden'}
WARMUP_LR, MIN_LR = 1e-6, 1e-6
REFERENCE_BATCH = 1024


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0] + ' (paper Tab. 1, 2, 4, 5; App. D)')
    default = lambda key: f'[paper: {PAPER[key]}; --data demo: {DEMO[key]}]'
    recipe = lambda key: '[' + ', '.join(f'{m} {r[key]:g}' for m, r in RECIPES.items()) + ']'
    g = p.add_argument_group('what to probe')
    g.add_argument('--method', default='linear', choices=METHODS, help='linear: linear probe of a frozen backbone '
                   '(Tab. 1, 2, 5); tokens-mlp / tokens-vit: classify the token files alone (Tab. 4) [linear]')
    g.add_argument('--checkpoint', default=None, help='linear: backbone.pt or ckpt.pt written by pretrain.py, or '
                   '"none": a randomly initialised backbone, the baseline')
    g.add_argument('--model', default=None, choices=list(model.MODEL_CONFIGS), help='linear: the ViT size, which '
                   'must agree with the checkpoint [the checkpoint\'s; with none: base, --data demo: micro]; '
                   'tokens-vit: the ViT over the token grid [tiny, the paper\'s ViT-T; --data demo: micro]')
    g.add_argument('--cached', default=None, action=argparse.BooleanOptionalAction, help='linear: extract the '
                   'features once, without augmentation, and train the head on them (a fast approximation, '
                   f'reported as linear-cached) {default("cached")}')
    g.add_argument('--tokens', default=None, help='tokens-*: token dir of the train split (tokenizer.py) '
                   f'{default("tokens")}')
    g.add_argument('--val-tokens', default=None, help='tokens-*: token dir of the val split, same codebook '
                   f'(tokenizer.py --split val --codebook TOKENS) {default("val_tokens")}; the demo\'s are made '
                   'if missing')
    g.add_argument('--embed-dim', type=int, default=None, help='tokens-mlp: token embedding width (the paper\'s '
                   f'value is lost from its text; ViT-T\'s width) [{TOKEN_MLP["embed_dim"]}]')
    g.add_argument('--hidden', type=int, default=None, help='tokens-mlp: width of the Linear before the ReLU '
                   f'[{TOKEN_MLP["hidden"]}]')
    g = p.add_argument_group('data')
    g.add_argument('--data', default='demo', help='demo | an ImageFolder root with train/ and val/ (ImageNet) | '
                   + ' | '.join(data.TORCHVISION_DATASETS) + ' (Tab. 5: food101, stanford_cars, fgvc_aircraft) [demo]')
    g.add_argument('--data-root', default='data', help='where torchvision datasets are (downloaded) [data]')
    g.add_argument('--workers', type=int, default=None, help=f'data loader processes per GPU {default("workers")}')
    g.add_argument('--crop-scale', type=float, default=None, help='linear: smallest area fraction of the training '
                   f'random resized crop {default("crop_scale")}')
    g.add_argument('--eval-crop', type=float, default=None, help='linear: centre crop fraction at evaluation '
                   f'(and for --cached features) {default("eval_crop")}')
    g = p.add_argument_group('optimisation (App. D: AdamW, cosine)')
    demo_epochs = ', '.join(f'{m}: {r["epochs"]}' for m, r in DEMO_RECIPES.items() if 'epochs' in r)
    g.add_argument('--epochs', type=int, default=None, help=f'epochs {default("epochs")}; on the demo, {demo_epochs}')
    g.add_argument('--batch-size', type=int, default=None, help=f'global batch {default("batch_size")}')
    g.add_argument('--lr', type=float, default=None, help=f'peak lr at batch 1024, scaled linearly {recipe("lr")}; '
                   f'linear on the demo: {DEMO_RECIPES["linear"]["lr"]}')
    g.add_argument('--weight-decay', type=float, default=None, help=f'AdamW weight decay {recipe("weight_decay")}')
    g.add_argument('--warmup-epochs', type=float, default=None, help='linear warmup from 1e-6 '
                   f'{default("warmup_epochs")}')
    g.add_argument('--dtype', default='auto', choices=('auto', 'bfloat16', 'float16', 'float32'),
                   help='auto: bfloat16 on Ampere and later GPUs, float16 on older ones, float32 on CPU [auto]')
    g = p.add_argument_group('run')
    g.add_argument('--seed', type=int, default=0, help='seeds the initialisation, data order and every draw [0]')
    g.add_argument('--results', default=os.path.join('runs', 'results.jsonl'), help='JSON-lines file the result '
                   'line is appended to [runs/results.jsonl]')
    return p


def resolve_args(args):
    """Fill the defaults that --data and --method select, refuse flags the method does not use;
    raises ValueError."""
    linear = args.method == 'linear'
    own = {'checkpoint', 'cached', 'crop_scale', 'eval_crop'} if linear else {'tokens', 'val_tokens'}
    own |= {'model'} if args.method != 'tokens-mlp' else {'embed_dim', 'hidden'}
    for key in ('checkpoint', 'cached', 'crop_scale', 'eval_crop', 'tokens', 'val_tokens', 'model', 'embed_dim',
                'hidden'):
        if key not in own and getattr(args, key) is not None:
            raise ValueError(f'--{key.replace("_", "-")} is not used by --method {args.method}')
    if linear and args.checkpoint is None:
        raise ValueError('--method linear needs --checkpoint: a backbone.pt from pretrain.py, or none')
    demo = args.data == 'demo'
    defaults = {**(DEMO if demo else PAPER), **RECIPES[args.method], **TOKEN_MLP,
                **(DEMO_RECIPES.get(args.method, {}) if demo else {})}
    for key, value in defaults.items():
        if (key in own or key not in OPTIONAL) and getattr(args, key) is None:
            setattr(args, key, value)
    if not linear and (args.tokens is None or args.val_tokens is None):
        raise ValueError(f'--method {args.method} needs --tokens and --val-tokens: the train and val token dirs '
                         f'(python tokenizer.py --data {args.data} --split train --out DIR, then --split val '
                         '--codebook DIR --out VAL_DIR)')
    for key in ('epochs', 'batch_size', 'lr', 'embed_dim', 'hidden', 'crop_scale', 'eval_crop'):
        value = getattr(args, key)
        if value is not None and not value > 0:
            raise ValueError(f'--{key.replace("_", "-")} must be positive, got {value}')
    for key in ('crop_scale', 'eval_crop'):
        if getattr(args, key) is not None and getattr(args, key) > 1:
            raise ValueError(f'--{key.replace("_", "-")} must be at most 1, got {getattr(args, key)}')
    for key in ('weight_decay', 'warmup_epochs', 'workers'):
        if getattr(args, key) < 0:
            raise ValueError(f'--{key.replace("_", "-")} must not be negative, got {getattr(args, key)}')
    return args


# ----------------------------------------------------------------------------------------------
# Linear probe (Tab. 1, 2, 5; App. D).


class LinearProbe(nn.Module):
    """Frozen backbone -> its pooled features (mean of the final patch tokens -> fc_norm, Sec. 5.1)
    -> a trained Linear. The backbone stays in eval mode (no drop path) and takes no gradient."""

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
        return self.backbone.pool(self.backbone.forward_features(images))   # (B, D)

    def forward(self, images):
        return self.head(self.features(images))


def load_frozen_backbone(args):
    """The backbone without a classifier (num_classes=0), no drop path; (model, report)."""
    if args.checkpoint == 'none':
        args.model = args.model or ('micro' if args.data == 'demo' else 'base')
        with torch.random.fork_rng(devices=[]):  # the same random backbone on every rank
            torch.manual_seed(args.seed)
            vit = model.create_model(args.model, num_classes=0, drop_path_rate=0.0)
        return vit, f'--checkpoint none: a randomly initialised {args.model} ViT, the baseline'
    expect = {k: model.MODEL_CONFIGS[args.model][k] for k in training.SIZE_KEYS} if args.model else None
    vit, report = training.load_backbone(args.checkpoint, 0, 0.0, expect)
    args.model = training.size_name(vit.config)
    return vit, report


def probe_transform(img_size, crop_scale):
    """App. D: random resized crop (bicubic) and horizontal flip, nothing else."""
    return transforms.Compose([
        transforms.RandomResizedCrop(img_size, scale=(crop_scale, 1.0),
                                     interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD),
    ])


@torch.no_grad()
def extract(probe, dataset, batch_size, workers, d, dtype):
    """(features (n_r, D) float32 CPU, labels (n_r,)) of this rank's shard of `dataset`."""
    loader = training.eval_loader(dataset, batch_size, workers, d)
    features, labels = [], []
    for batch in tqdm(loader, disable=not d.is_main, desc='features', leave=False, dynamic_ncols=True):
        if batch is None:
            continue
        with training.autocast(dtype, d.device):
            features.append(probe.features(batch[0].to(d.device, non_blocking=True)).float().cpu())
        labels.append(batch[1])
    return torch.cat(features), torch.cat(labels)


# ----------------------------------------------------------------------------------------------
# Tokens-only classification (Tab. 4).


class TokenMLP(nn.Module):
    """Tab. 4's MLP head: token embedding -> Linear -> ReLU -> mean over the tokens -> Linear."""

    def __init__(self, vocab_size, num_classes, embed_dim, hidden):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.fc = nn.Linear(embed_dim, hidden)
        self.head = nn.Linear(hidden, num_classes)
        nn.init.normal_(self.embed.weight, std=0.02)
        model.init_weights(self.fc)
        model.init_weights(self.head)

    def forward(self, tokens):                                   # (B, N) int64
        return self.head(F.relu(self.fc(self.embed(tokens))).mean(dim=1))   # (B, classes)


def token_vit(size, vocab_size, num_classes, grid):
    """Tab. 4's ViT over the G x G token grid: model.py's ViT (CLS, position embeddings, blocks,
    mean pooling, head) with its patch embedding replaced by a learned embedding of the token ids,
    (B, N) -> (B, N, D), so forward(tokens) runs the ViT on the tokens."""
    vit = model.create_model(size, img_size=grid, patch_size=1, num_classes=num_classes)
    vit.patch_embed = nn.Embedding(vocab_size, vit.embed_dim)
    nn.init.normal_(vit.patch_embed.weight, std=0.02)
    return vit


def labels_of(dataset):
    """Every label of a dataset, read without decoding any image (the tokens are all we use)."""
    for attr in ('targets', 'labels', '_labels'):    # ImageFolder, CIFAR / demo, STL10 / Food101, FGVC-Aircraft
        if hasattr(dataset, attr):
            return np.asarray(getattr(dataset, attr))
    return np.asarray([label for _, label in dataset._samples])      # Stanford Cars


class TokenSet(Dataset):
    """(tokens (N,) int64, label) of every image the tokenizer could read (meta['skipped'] dropped)."""

    def __init__(self, tokens, labels, skipped=()):
        self.tokens, self.labels = tokens, labels
        skipped = set(skipped)
        self.rows = [i for i in range(len(labels)) if i not in skipped]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, j):
        i = self.rows[j]
        return torch.from_numpy(self.tokens[i].astype(np.int64).reshape(-1)), int(self.labels[i])


def load_token_sets(args, d):
    """(train TokenSet, val TokenSet, classes, vocabulary, grid), the token files checked against
    the dataset and against each other (the same codebook)."""
    if args.data == 'demo':
        tokenizer.ensure_demo_tokens(args.tokens, 'train', d.device)
        tokenizer.ensure_demo_tokens(args.val_tokens, 'val', d.device, codebook=args.tokens)
    sets = []
    for split, token_dir in (('train', args.tokens), ('val', args.val_tokens)):
        dataset = data.build_dataset(args.data, split, args.data_root)
        meta_path = os.path.join(token_dir, 'meta.json')
        if not os.path.isfile(meta_path):
            raise ValueError(f'no token file {meta_path}: run `python tokenizer.py --data {args.data} --split {split} '
                             f'--out {token_dir}`' + ('' if split == 'train' else f' --codebook {args.tokens}'))
        grid = tokenizer.read_meta(token_dir)['grid']
        tokens, meta = data.load_tokens(token_dir, args.data, split, len(dataset), grid)
        sets.append((TokenSet(tokens, labels_of(dataset), meta.get('skipped', ())), dataset.classes, meta))
    (train, classes, meta), (val, _, val_meta) = sets
    books = [np.load(os.path.join(t, 'codebook.npy'), mmap_mode='r') for t in (args.tokens, args.val_tokens)]
    if meta['grid'] != val_meta['grid'] or books[0].shape != books[1].shape or not np.array_equal(*books):
        raise ValueError(f'{args.val_tokens} was not made with the codebook of {args.tokens}: run `python tokenizer.py '
                         f'--data {args.data} --split val --codebook {args.tokens} --out {args.val_tokens}`')
    return train, val, classes, meta['vocab_size'], meta['grid']


# ----------------------------------------------------------------------------------------------
# One training loop for every method: AdamW, linear warmup, cosine (App. D).


def main(argv=None):
    """Run one probe; returns its result dict (top1, top5, count, epochs, seconds, method)."""
    return training.run_command('probe.py', get_args_parser(), resolve_args, run, argv)


def run(args, d):
    device, W = d.device, d.world_size
    start_time = time.time()
    try:
        if args.batch_size % W:
            raise ValueError(f'--batch-size {args.batch_size} is not divisible by {W} processes')
        micro = args.batch_size // W
        training.seed_everything(args.seed, d.rank)
        dtype = training.resolve_dtype(args.dtype, device)
        if args.method == 'linear':
            parts = linear_parts(args, d, micro, dtype)
        else:
            parts = token_parts(args, d, micro)
    except ValueError as e:
        raise SystemExit(f'probe.py: {e}') from None
    method, source, classifier, trainable, encode, train_batches, n_train, val_loader = parts

    steps_per_epoch = n_train // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f'probe.py: {n_train} training images, fewer than one --batch-size {args.batch_size}')
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    peak_lr = args.lr * args.batch_size / REFERENCE_BATCH
    print0(f'{method} on {args.data}: {n_train} training images, batch {args.batch_size} = {W} process(es) x {micro}; '
           f'lr {args.lr:g} x {args.batch_size}/{REFERENCE_BATCH} = {peak_lr:.3g}, {steps_per_epoch} steps/epoch, '
           f'{args.epochs} epochs; {sum(p.numel() for p in trainable.parameters()) / 1e6:.2f}M trained parameters')
    optimizer = torch.optim.AdamW(training.param_groups(trainable, args.weight_decay), lr=0.0)
    ddp = DistributedDataParallel(trainable, device_ids=[d.local_rank] if device.type == 'cuda' else None) \
        if W > 1 else None
    bar = tqdm(total=total_steps, disable=not d.is_main, desc=method, dynamic_ncols=True)
    classifier.train()
    step = 0
    for epoch in range(args.epochs):
        batches, losses = train_batches(epoch), []
        for _ in range(steps_per_epoch):
            batch = next(batches)
            if batch is None:
                raise SystemExit(f'probe.py: every image of a batch in epoch {epoch + 1} is unreadable')
            inputs, labels = batch
            lr = training.lr_at(step, total_steps, warmup_steps, peak_lr, MIN_LR, WARMUP_LR)
            for group in optimizer.param_groups:
                group['lr'] = lr
            with training.autocast(dtype, device):
                logits = (ddp or trainable)(encode(inputs.to(device, non_blocking=True)))
            loss = F.cross_entropy(logits.float(), labels.to(device, non_blocking=True))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(loss.detach())
            bar.update()
        loss = torch.stack(losses).mean()
        if dist.is_initialized():
            dist.all_reduce(loss)
            loss /= W
        if not torch.isfinite(loss):
            raise SystemExit(f'probe.py: non-finite loss in epoch {epoch + 1}: lower --lr')
        bar.set_postfix(loss=f'{float(loss):.3f}', lr=f'{lr:.2e}')
    bar.close()
    result = training.evaluate(classifier, val_loader, device, dtype)
    seconds = time.time() - start_time
    training.record_result(args.results, method=method, checkpoint=source, data=args.data, model=args.model,
                           top1=result['top1'], top5=result['top5'], images=result['count'], epochs=args.epochs,
                           seconds=round(seconds, 1))
    return dict(result, method=method, epochs=args.epochs, seconds=seconds)


def linear_parts(args, d, micro, dtype):
    """The linear probe's pieces: (method, source, classifier to evaluate, module to train,
    encode(inputs) -> its inputs, train_batches(epoch) -> iterator of (inputs, labels), training
    images, validation loader)."""
    backbone, report = load_frozen_backbone(args)
    print0(report)
    img_size = backbone.patch_embed.img_size
    val = data.build_dataset(args.data, 'val', args.data_root, data.eval_transform(img_size, args.eval_crop))
    probe = LinearProbe(backbone, len(val.classes)).to(d.device)
    train_aug = probe_transform(img_size, args.crop_scale)
    train = data.build_dataset(args.data, 'train', args.data_root,
                               data.eval_transform(img_size, args.eval_crop) if args.cached else train_aug)
    if not args.cached:
        # App. D: augmented images through the frozen backbone at every step.
        sampler = data.EpochSampler(train, d.world_size, d.rank, args.seed,
                                        per_epoch=len(train) // args.batch_size * micro)
        loader = DataLoader(data.SeededSet(train, args.seed), batch_size=micro, sampler=sampler,
                            num_workers=args.workers, collate_fn=data.collate_skip, drop_last=True,
                            pin_memory=d.device.type == 'cuda', persistent_workers=args.workers > 0,
                            generator=torch.Generator())

        def train_batches(epoch):
            sampler.set_epoch(epoch)
            return iter(loader)
        val_loader = training.eval_loader(val, micro, args.workers, d)
        return 'linear', args.checkpoint, probe, probe.head, probe.features, train_batches, len(train), val_loader
    # --cached: every rank extracts its own shards once and trains on them.
    print0('--cached: features of un-augmented centre crops, extracted once (a fast approximation of the paper\'s '
           'protocol, reported as linear-cached)')
    train_x, train_y = extract(probe, train, micro, args.workers, d, dtype)
    val_x, val_y = extract(probe, val, micro, args.workers, d, dtype)
    local = TensorDataset(train_x, train_y)
    shortest = torch.tensor(len(local), device=d.device)   # every rank takes as many steps
    if dist.is_initialized():
        dist.all_reduce(shortest, op=dist.ReduceOp.MIN)

    def train_batches(epoch):
        order = torch.randperm(len(local), generator=torch.Generator().manual_seed(
            data.seed_for(args.seed, epoch, d.rank)))
        return iter(DataLoader(local, batch_size=micro, sampler=order.tolist(), drop_last=True))
    # An evaluation loader over this rank's cached validation shard: training.evaluate sums over ranks.
    val_loader = DataLoader(TensorDataset(val_x, val_y), batch_size=micro)
    return ('linear-cached', args.checkpoint, probe.head, probe.head, lambda x: x, train_batches,
            int(shortest) * d.world_size, val_loader)


def token_parts(args, d, micro):
    """The tokens-only pieces, in the order of linear_parts."""
    train, val, classes, vocab, grid = load_token_sets(args, d)
    if args.method == 'tokens-mlp':
        net = TokenMLP(vocab, len(classes), args.embed_dim, args.hidden)
    else:
        args.model = args.model or ('micro' if args.data == 'demo' else 'tiny')
        net = token_vit(args.model, vocab, len(classes), grid)
    net.to(d.device)
    print0(f'{args.method}: {vocab}-token vocabulary, {grid}x{grid} tokens per image, {len(classes)} classes, '
           f'{len(train)} / {len(val)} train / val images')
    sampler = DistributedSampler(train, num_replicas=d.world_size, rank=d.rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    loader = DataLoader(train, batch_size=micro, sampler=sampler, num_workers=args.workers, drop_last=True,
                        pin_memory=d.device.type == 'cuda', persistent_workers=args.workers > 0)

    def train_batches(epoch):
        sampler.set_epoch(epoch)
        return iter(loader)
    return (args.method, args.tokens, net, net, lambda x: x, train_batches, len(train),
            training.eval_loader(val, micro, args.workers, d))


if __name__ == '__main__':
    main()
