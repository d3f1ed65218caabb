"""k-CLIP, the visual tokenizer of MaPeT (paper Sec. 4.2), as a command.

A patch's token is its nearest centroid in a k-means codebook (K=8192) fitted to 10% of the
patch features: CLIP ResNet `layer4` at 32*G px, one per cell of a G x G grid (offline: `--features
hog`, edge histograms, the demo's; `pixels`, the ViT's raw patches). `--features vqkd` takes BEiT
v2's released tokenizer instead (Sec. 5), no k-means.

    python tokenizer.py --data demo --split train --out runs/tok_train  # ~20 s on a CPU
    python tokenizer.py --data demo --split val --codebook runs/tok_train --out runs/tok_val
    python tokenizer.py --data demo --split train --features pixels --grid 14 --patch 16 \\
        --out runs/tokens/demo_g14  # for a 224 px ViT, ~3 min on a CPU
    torchrun --nproc_per_node=8 tokenizer.py --data /path/imagenet --split train --clip RN50x64 \\
        --out tokens/in1k_rn50x64  # the paper's tokenizer
    torchrun --nproc_per_node=8 tokenizer.py --data /path/imagenet --split val \\
        --codebook tokens/in1k_rn50x64 --out tokens/in1k_rn50x64_val

Writes <out>/tokens.npy (uint16 [N, G, G]), codebook.npy (float32 [K, C]), meta.json. Features
are sampled by global id and k-means all-reduces its sums, so N processes fit the codebook of one
(up to float error).
"""
import argparse
import json
import math
import os
import shlex
import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision import transforms
from tqdm import tqdm

import clip_model
import data
import model
import training

# Collectives that also run as one process.


def world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_reduce_sum(t):
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


def all_gather_cat(t):
    """Every rank's rows of t (any number), in rank order, on every rank."""
    if world()[1] == 1:
        return t
    n = torch.tensor([len(t)], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world()[1])]
    dist.all_gather(sizes, n)
    padded = t.new_zeros((int(max(sizes)), *t.shape[1:]))
    padded[:len(t)] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s)] for p, s in zip(parts, sizes, strict=True)])


def id_uniform(ids, seed, stream):
    """A uniform in [0, 1) per global id: a splitmix64 hash of (id, seed, stream)."""
    key = np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0]
    z = ids.cpu().numpy().astype(np.uint64) ^ key
    with np.errstate(over='ignore'):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) / 2.0 ** 53)


# k-means in torch: chunked (bounded memory at K=8192, C=4096), any device, across ranks.


def assign(x, centroids, chunk=None):
    """(index [n], squared distance [n]) of each row's nearest centroid, in float32 on the
    centroids' device, in blocks of rows ([rows, K] ~256 MB)."""
    c = centroids.float()
    c2 = (c * c).sum(1)  # [K]
    index, dist2 = [], []
    for xb in x.split(chunk or max(1, 2 ** 26 // len(c))):
        xb = xb.to(c.device, torch.float32)
        d, i = torch.addmm(c2, xb, c.T, alpha=-2).min(1)  # min_K |c|^2 - 2 x.c
        index.append(i)
        dist2.append(d.add_((xb * xb).sum(1)).clamp_min_(0))  # + |x|^2 = |x - c|^2
    return torch.cat(index), torch.cat(dist2)


def kmeans_plusplus(x, k, generator):
    """Greedy k-means++ (as scikit-learn): each new centroid is the best, by inertia, of
    2 + ln(k) candidates drawn with probability ~ D(x)^2."""
    n, trials = len(x), 2 + int(math.log(k))
    x2 = (x * x).sum(1)

    def d2_to(rows):  # [n, len(rows)]
        return torch.addmm(x2[rows], x, x[rows].T, alpha=-2).add_(x2[:, None]).clamp_min_(0)

    chosen = [int(torch.randint(n, (1,), generator=generator))]
    closest = d2_to(chosen[:1])[:, 0]  # [n] to the nearest chosen
    for _ in range(1, k):
        cumulative = torch.cumsum(closest.double(), 0)
        u = torch.rand(trials, generator=generator, dtype=torch.float64).to(x.device)
        candidates = torch.searchsorted(cumulative, u * cumulative[-1]).clamp_max_(n - 1)
        d = torch.minimum(closest[:, None], d2_to(candidates))  # [n, trials]
        best = int(d.sum(0).argmin())
        closest = d[:, best]
        chosen.append(int(candidates[best]))
    return x[chosen]


def kmeans(x, k, iters=20, seed=0, init='k-means++', ids=None, init_points=65536, device=None,
           progress=False):
    """Lloyd's k-means on this rank's rows x [n, C] (global ids `ids`): centroids [K, C] and the
    inertia before each update [iters + 1]. `init`: [K, C], or k-means++ on rank 0 over
    ~max(init_points, 16 K) points picked by id."""
    rank, world_size = world()
    device = torch.device(device or x.device)
    ids = torch.arange(len(x)) if ids is None else ids
    n_total = int(all_reduce_sum(torch.tensor([len(x)], device=device)))
    if n_total < k:
        raise ValueError(f'cannot fit {k} centroids to {n_total} points: lower the vocabulary '
                         'or sample more')

    def gather(t, rows):  # t[rows] from all ranks
        return all_gather_cat(t[rows.to(t.device)].to(device))

    if isinstance(init, torch.Tensor):
        centroids = init.to(device, torch.float32).clone()
    else:
        keep = id_uniform(ids, seed, stream=1) < max(init_points, 16 * k) / n_total
        subset = gather(x, keep).float()[gather(ids, keep).argsort()]  # id order, any layout
        centroids = torch.empty(k, x.shape[1], device=device)
        if rank == 0:
            centroids = kmeans_plusplus(subset, k, torch.Generator().manual_seed(seed))
        if world_size > 1:
            dist.broadcast(centroids, 0)
    inertia = []
    for step in tqdm(range(iters + 1), desc='k-means', disable=not progress or rank != 0):
        index, dist2 = assign(x, centroids)
        inertia.append(float(all_reduce_sum(dist2.double().sum())))
        if step == iters:
            break
        sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=device)
        rows = max(1, 2 ** 26 // k)  # as assign's blocks
        for xb, ib in zip(x.split(rows), index.split(rows)):
            sums.index_add_(0, ib, xb.to(device, torch.float64))
        counts = all_reduce_sum(torch.bincount(index, minlength=k).double())
        all_reduce_sum(sums)
        full = counts[:, None] > 0
        centroids = torch.where(full, sums / counts.clamp_min(1)[:, None], centroids).float()
        if empty := (~full[:, 0]).nonzero()[:, 0].tolist():
            # Every rank offers its farthest rows; all agree on the top ones (ties by id).
            far = dist2.topk(min(len(empty), len(dist2))).indices
            by_id = gather(ids, far).argsort()
            order = by_id[torch.sort(-gather(dist2, far)[by_id], stable=True).indices]
            centroids[empty[:len(order)]] = gather(x, far)[order[:len(empty)]].float()
    return centroids, inertia


# Features: one C-dim vector per ViT patch, [B, G, G, C].


def pixel_features(images, patch):
    """[B, 3, pG, pG] images -> [B, G, G, 3*p*p], the ViT's patches in (channel, row, col) order."""
    B, _, S, _ = images.shape
    G = S // patch
    x = images.reshape(B, 3, G, patch, G, patch).permute(0, 2, 4, 1, 3, 5)  # [B, G, G, 3, p, p]
    return x.reshape(B, G, G, 3 * patch * patch)


def hog_features(images, patch, bins=9, floor=0.015):
    """[B, 3, pG, pG] images in [0, 1] -> [B, G, G, bins]: histograms of oriented gradients (HOG,
    MaskFeat's targets): a patch's edges, not its colour. Grey-level gradients vote into unsigned
    orientation bins over the 2p x 2p window centred on each patch; unit length, but a window
    whose mean gradient is far below `floor` (flat, or pixel noise) goes to ~0."""
    grey = F.pad(images.mean(1, keepdim=True), (1, 1, 1, 1), mode='replicate')
    gx = (grey[..., 1:-1, 2:] - grey[..., 1:-1, :-2]) / 2
    gy = (grey[..., 2:, 1:-1] - grey[..., :-2, 1:-1]) / 2
    position = torch.atan2(gy, gx).remainder(math.pi) * (bins / math.pi) - 0.5  # bin centres at k
    low = position.floor()
    upper = position - low  # the share of the upper bin
    magnitude = torch.hypot(gx, gy)
    votes = magnitude.new_zeros(images.shape[0], bins, *images.shape[2:])
    votes.scatter_add_(1, low.long().remainder(bins), magnitude * (1 - upper))
    votes.scatter_add_(1, (low.long() + 1).remainder(bins), magnitude * upper)
    window = F.avg_pool2d(votes, 2 * patch, stride=patch, padding=patch // 2).permute(0, 2, 3, 1)
    return window / (window.norm(dim=-1, keepdim=True) + floor)


def clip_features(model, images):
    """[B, 3, 32G, 32G] CLIP-normalised images -> layer4 map [B, G, G, C] (Sec. 4.2)."""
    with torch.no_grad(), torch.autocast('cuda', torch.float16, enabled=images.is_cuda):
        f = model.encode_dense(images)  # [B, C, G, G]
    return f.float().permute(0, 2, 3, 1)


# VQ-KD (BEiT v2, Peng et al. 2022). assign's nearest code is the quantizer's, argmin |z - w|^2 with
# |z| = 1: for the released codes, unit vectors (norm EMA), the one of highest cosine.

VQKD_URL = 'https://github.com/addf400/files/releases/download/BEiT-v2/{}-{}.pth'
VQKD = {'vqkd_encoder_base_decoder_3x768x12_clip': 'd5036aa7',  # BEiT v2's for pre-training
        'vqkd_encoder_base_decoder_1x768x12_clip': 'd93179da'}  # first digits of the SHA-256


def load_vqkd(name_or_path, device):
    """(model.py's ViT, the task layer as head; codebook [K, C]) of a file or a VQKD name (into
    torch.hub's cache, as BEiT v2's code). BEiT's ViT differs in three places: q, v biases, no k
    bias (qkv.bias = [q; 0; v]); no layer scale (gamma = 1); the final norm: fc_norm per patch."""
    if name_or_path in VQKD:
        digest = VQKD[name_or_path]
        path = clip_model.download(VQKD_URL.format(name_or_path, digest),
                                   os.path.join(torch.hub.get_dir(), 'checkpoints'), digest)
    elif not os.path.isfile(path := name_or_path):
        raise SystemExit(f'no VQ-KD tokenizer {path!r}: not a file, nor one of {", ".join(VQKD)}')
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # BEiT saves its args
            sd = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 (the unpickler raises any type)
        raise SystemExit(f'cannot read {path} ({type(e).__name__}): not a checkpoint') from None
    sd = dict(sd.get('model', sd.get('state_dict', sd))) if isinstance(sd, dict) else {}  # BEiT's

    def size(key, dim, base):
        t = sd.get(key)
        return t.shape[dim] if isinstance(t, torch.Tensor) and t.dim() > dim else base

    def take(key, shape):
        if not isinstance(t := sd.pop(key, None), torch.Tensor) or t.shape != shape:
            found = list(t.shape) if isinstance(t, torch.Tensor) else 'missing'
            raise SystemExit(f'{path} is not a VQ-KD checkpoint: {key} is {found}, expected '
                             f'{list(shape)}')
        return t.float()

    w, q = 'encoder.patch_embed.proj.weight', 'quantize.embedding.weight'  # absent: ViT-B's
    D, p, K, C = size(w, 0, 768), size(w, 2, 16), size(q, 0, 8192), size(q, 1, 32)
    G = math.isqrt(size('encoder.pos_embed', 1, 197) - 1)
    depth = len({k.split('.')[2] for k in sd if k.startswith('encoder.blocks.')}) or 12
    with torch.device('meta'):  # every tensor from the file; sizes from its shapes, heads of 64
        vit = model.VisionTransformer(G * p, p, D, depth, D // 64, drop_path_rate=0, layer_scale=1)
        vit.head = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, C))
    weights = {}
    for k, v in vit.state_dict().items():
        key = 'encode_task_layer.' + k[5:] if k.startswith('head.') else 'encoder.' + k
        if k.endswith('.gamma'):
            weights[k] = torch.ones(v.shape)
        elif k.endswith('qkv.bias'):
            qb, vb = (take(key.removesuffix('qkv.bias') + n, (D,)) for n in ('q_bias', 'v_bias'))
            weights[k] = torch.cat([qb, torch.zeros(D), vb])
        else:
            weights[k] = take(key, v.shape)
    vit.load_state_dict(weights, assign=True)
    codebook = take(q, (K, C))
    # left by name: the decoder, the quantizer's EMA statistics, what BEiT v2's loader drops
    if other := [k for k in sd if not k.startswith(('decoder.', 'decode_task_layer.', 'quantize.',
                                                    'teacher', 'scaling', 'loss'))]:
        raise SystemExit(f'{path} is not a VQ-KD checkpoint: unexpected {other[0]}')
    return vit.to(device).eval(), codebook


def vqkd_features(vit, images):
    """[B, 3, pG, pG] images in [-1, 1] -> [B, G, G, C]: VQKD.encode, L2-normalised (quantizer)."""
    with torch.no_grad():
        with torch.autocast('cuda', torch.float16, enabled=images.is_cuda):  # as BEiT v2 trains
            x = vit.fc_norm(vit.forward_features(images)[:, 1:])
        f = F.normalize(vit.head(x.float()), dim=-1)  # the task layer in float32, as VQKD.encode
    return f.unflatten(1, (vit.patch_embed.grid,) * 2)


def feature_pipeline(args, device):
    """(transform, images -> features, image size, C, VQ-KD's codebook or None); normalised by
    batch on the device, as per-image ops in the loader are slow."""
    codebook = None
    if args.features == 'pixels':
        size, norm = args.patch * args.grid, (data.IMAGENET_MEAN, data.IMAGENET_STD)
        features, dim = partial(pixel_features, patch=args.patch), 3 * args.patch ** 2
    elif args.features == 'hog':
        size, norm = args.patch * args.grid, ((0, 0, 0), (1, 1, 1))  # pixels in [0, 1]
        features, dim = partial(hog_features, patch=args.patch), 9
    elif args.features == 'vqkd':
        try:
            vit, codebook = load_vqkd(args.vqkd, device)
        except SystemExit as e:
            raise SystemExit(f'tokenizer.py: --vqkd: {e}') from None
        G, (K, C) = vit.patch_embed.grid, codebook.shape
        if (args.grid, args.vocab) != (G, K):
            raise SystemExit(f'tokenizer.py: --vqkd {args.vqkd} makes {G}x{G} tokens of {K}: '
                             f'pass --grid {G} --vocab {K}')
        size, norm = vit.patch_embed.img_size, ((0.5,) * 3, (0.5,) * 3)  # BEiT v2: to [-1, 1]
        features, dim = partial(vqkd_features, vit), C
    else:
        try:
            model = clip_model.load(args.clip, device)
        except SystemExit as e:
            raise SystemExit(f'tokenizer.py: --clip: {e}') from None
        size, norm = 32 * args.grid, (clip_model.IMAGE_MEAN, clip_model.IMAGE_STD)
        features, dim = partial(clip_features, model), 32 * model.config.vision_width
    mean, std = (255 * torch.tensor(v, device=device)[:, None, None] for v in norm)

    def features_of(images):  # [B, 3, S, S] uint8 -> [B, G, G, C]
        return features((images.to(device, non_blocking=True) - mean) / std)

    return (transforms.Compose([data.pretrain_geometry(size), transforms.PILToTensor()]),
            features_of, size, dim, codebook)


# The command: arguments -> features -> codebook -> tokens -> files.


def get_args_parser():
    p = argparse.ArgumentParser('tokenizer.py', description='k-CLIP visual tokenizer (Sec. 4.2)')
    g = p.add_argument_group('data')
    g.add_argument('--data', default='demo', help='demo | an ImageFolder root (train/, val/) | '
                   + ' | '.join(data.TORCHVISION_DATASETS) + ' [demo]')
    g.add_argument('--split', default='train', choices=data.SPLITS,
                   help='fit on train; tokenize val with --codebook [train]')
    g.add_argument('--data-root', default='data', help='torchvision download dir [data]')
    g.add_argument('--out', required=True, help='dir for the token files')
    g = p.add_argument_group('features (demo: hog, grid 4, patch 8; --codebook: its own)')
    g.add_argument('--features', choices=('clip', 'hog', 'pixels', 'vqkd'),
                   help='clip: CLIP layer4 (paper); hog: edges (demo); pixels: raw patches; '
                   'vqkd: BEiT v2\'s tokens, no k-means (paper) [clip]')
    g.add_argument('--vqkd', help=f'{" or ".join(VQKD)} or a BEiT v2 file [{[*VQKD][0]}]')
    g.add_argument('--clip', help=f'{", ".join(clip_model.MODELS)} or an OpenAI checkpoint file; '
                   'paper: RN50x64 [RN50]')
    g.add_argument('--grid', type=int, help='tokens per side G (CLIP at 32*G px) [14]')
    g.add_argument('--patch', type=int, help='hog, pixels: the ViT patch (images at p*G px) [16]')
    g = p.add_argument_group('k-means (demo: vocab 64; --codebook: its own)')
    g.add_argument('--vocab', type=int, help='codebook size K [8192]')
    g.add_argument('--sample', type=float, help='fraction of features fitted [0.1]')
    g.add_argument('--iters', type=int, help='Lloyd iterations [20]')
    g.add_argument('--seed', type=int, help='of the feature sample and k-means++ [0]')
    g.add_argument('--codebook', help='token dir of a fitted codebook: only assign (val split)')
    g = p.add_argument_group('run')
    g.add_argument('--batch-size', type=int, help='images per process [64; demo: 500]')
    g.add_argument('--workers', type=int, help='loader processes per rank [min(10, CPUs); demo: 0]')
    g.add_argument('--device', help='cuda | cpu | cuda:N [cuda if available]')
    return p


def read_meta(token_dir):
    with open(os.path.join(token_dir, 'meta.json')) as f:
        return json.load(f)


def command(args, **changes):
    """The command line of these settings with `changes`, set flags only: a fix to paste."""
    parser, argv = get_args_parser(), []
    for key, value in {**vars(args), **changes}.items():
        if value is not None and (key in ('data', 'split') or value != parser.get_default(key)):
            argv += [f'--{key.replace("_", "-")}', str(value)]
    return shlex.join(['python', 'tokenizer.py', *argv])


def resolve_args(args):
    """Fill the defaults that depend on --data and --codebook; ValueError for a contradiction."""
    demo, book = args.data == 'demo', args.codebook
    if args.device is not None:
        training.check_device(args.device)
    if book:
        if not os.path.isfile(os.path.join(book, 'codebook.npy')):
            fit = command(args, split='train', codebook=None, out=book)
            raise ValueError(f'--codebook {book} holds no codebook.npy: fit one first with `{fit}`')
        if os.path.realpath(args.out) == os.path.realpath(book):
            raise ValueError(f'--out {args.out} is the --codebook dir: its tokens would be lost')
        meta = read_meta(book)
        kind, _, name = meta['features'].partition(':')
        fixed = {'features': kind, **{k: name if k == kind else None for k in ('clip', 'vqkd')},
                 'grid': meta['grid'], 'vocab': meta['vocab_size'],
                 'patch': None if name else meta['image_size'] // meta['grid'],
                 **{k: meta.get(k) for k in ('sample', 'iters', 'seed')}}  # none: VQ-KD
        for key, value in fixed.items():
            if getattr(args, key) not in (None, value):
                raise ValueError(f'--{key} {getattr(args, key)} does not match the codebook in '
                                 f'{book} ({key} {value}): drop --{key} or fit a new one')
            setattr(args, key, value)
    defaults = {'features': 'hog' if demo else 'clip', 'grid': 4 if demo else 14,
                'vocab': 64 if demo else 8192, 'sample': 0.1, 'iters': 20, 'seed': 0,
                'batch_size': 500 if demo else 64,
                'workers': 0 if demo else training.default_workers()}
    vars(args).update({k: v for k, v in defaults.items() if getattr(args, k) is None})
    if args.features in ('clip', 'vqkd') and args.patch is not None:
        raise ValueError('--patch applies to --features hog or pixels: drop it')
    for kind, default in (('clip', 'RN50'), ('vqkd', [*VQKD][0])):
        if args.features == kind:
            setattr(args, kind, getattr(args, kind) or default)
        elif getattr(args, kind) is not None:
            raise ValueError(f'--{kind} applies to --features {kind}: drop it')
    if args.features in ('hog', 'pixels') and args.patch is None:
        args.patch = 8 if demo else 16
    if not 0 < args.sample <= 1:
        raise ValueError(f'--sample {args.sample} is not in (0, 1]: it is a fraction')
    if not 1 <= args.vocab <= 65536:
        raise ValueError(f'--vocab {args.vocab} is not in 1..65536 (tokens are stored as uint16)')
    training.check_args(args, positive=('grid', 'patch', 'batch_size'),
                        ranges=(('iters', 0, math.inf), ('workers', 0, math.inf)))
    return args


def patch_features(loader, features_of, desc):
    """(image indices [B], features [B*G*G, C]) per batch of this rank's readable images."""
    for batch in tqdm(loader, desc=desc, disable=world()[0] != 0):
        if batch is not None:  # None: no readable image
            index, images, _ = batch
            f = features_of(images)  # [B, G, G, C]
            yield index, f.reshape(-1, f.shape[-1])


def fit_codebook(args, batches, mine, dim, device):
    """(codebook, the fit's record): k-means on a random `--sample` of all features (Sec. 4.2),
    picked by global id (image index * G^2 + position)."""
    G = args.grid

    def sampled(index):  # [B] image indices -> ids [B*G*G], whether sampled [B*G*G]
        ids = (index[:, None] * G * G + torch.arange(G * G)).reshape(-1)
        return ids, id_uniform(ids, args.seed, stream=0) < args.sample

    n_mine = sum(int(sampled(c)[1].sum()) for c in mine.split(65536))
    n_fit = int(all_reduce_sum(torch.tensor([n_mine], device=device)))
    if n_fit < args.vocab:
        raise SystemExit(f'tokenizer.py: --vocab {args.vocab} is more than the {n_fit} sampled '
                         'features: lower --vocab or raise --sample')
    # Host memory, allocated once (float16 from a GPU): 25M x 4096 for RN50x64 on ImageNet.
    x = torch.empty(n_mine, dim, dtype=torch.float16 if device.type == 'cuda' else torch.float32)
    x_ids, n = torch.empty(n_mine, dtype=torch.int64), 0
    for index, f in batches:
        ids, keep = sampled(index)
        m = int(keep.sum())
        x[n:n + m], x_ids[n:n + m], n = f[keep.to(device)].cpu(), ids[keep], n + m
    try:
        codebook, inertia = kmeans(x[:n], args.vocab, args.iters, args.seed, ids=x_ids[:n],
                                   device=device, progress=True)
    except ValueError as e:  # too few readable images
        raise SystemExit(f'tokenizer.py: {e}') from None
    return codebook, {'sample': args.sample, 'iters': args.iters, 'seed': args.seed,
                      'features_fitted': n_fit, 'inertia': inertia}


def tokenize_images(batches, codebook, G, device):
    """(image indices [n], tokens [n, G*G]): every patch's nearest centroid, from all ranks."""
    rows = [torch.empty(0, dtype=torch.int64, device=device)]
    tokens = [torch.empty(0, G * G, dtype=torch.int32, device=device)]
    for index, f in batches:
        rows.append(index.to(device))
        tokens.append(assign(f, codebook)[0].reshape(-1, G * G).int())
    return all_gather_cat(torch.cat(rows)).cpu(), all_gather_cat(torch.cat(tokens)).cpu()


def write_token_files(args, n, rows, tokens, codebook, fit, image_size, seconds):
    G, K = args.grid, args.vocab
    grid = np.zeros((n, G, G), dtype=np.uint16)
    grid[rows.numpy()] = tokens.numpy().reshape(-1, G, G)
    counts = np.bincount(tokens.numpy().ravel(), minlength=K)
    p = counts[counts > 0] / max(counts.sum(), 1)
    meta = {'dataset': data.dataset_id(args.data), 'split': args.split, 'num_images': n,
            'grid': G, 'vocab_size': K, 'image_size': image_size,
            'features': f'{args.features}:{getattr(args, args.features)}'
            if args.features in ('clip', 'vqkd') else args.features,
            'feature_dim': codebook.shape[1], **fit,
            'codebook_from': os.path.realpath(args.codebook) if args.codebook else None,
            'skipped': sorted(set(range(n)) - set(rows.tolist())),
            'tokens_used': int((counts > 0).sum()), 'perplexity': float(np.exp(-p @ np.log(p))),
            'world_size': world()[1], 'seconds': round(seconds, 1)}
    data.write_tokens(args.out, grid, codebook.cpu().numpy(), meta)
    inertia = fit.get('inertia')  # none: VQ-KD's codebook
    print(f'{n} images ({len(meta["skipped"])} unreadable), {meta["features"]} features '
          f'[{G}, {G}, {codebook.shape[1]}] at {image_size} px; '
          + (f'inertia {inertia[0]:.4g} -> {inertia[-1]:.4g}; ' if inertia else '')
          + f'{meta["tokens_used"]}/{K} tokens used, perplexity '
          f'{meta["perplexity"]:.1f}; {seconds:.1f} s -> {args.out}')
    return meta


def main(argv=None):
    """Run on every rank; returns meta (what meta.json holds) on rank 0, else None."""
    try:
        args = resolve_args(get_args_parser().parse_args(argv))
        dataset = data.build_dataset(args.data, args.split, args.data_root)
    except (ValueError, OSError) as e:
        raise SystemExit(f'tokenizer.py: {e}') from None
    created = 'RANK' in os.environ and not dist.is_initialized()  # else the caller's, if any
    d = training.setup_distributed(args.device)
    training.print_run(args)
    start = time.time()
    dataset.transform, features_of, image_size, dim, codebook = feature_pipeline(args, d.device)
    fit = {}  # VQ-KD: no k-means
    if args.codebook:
        codebook = torch.from_numpy(np.load(os.path.join(args.codebook, 'codebook.npy')))
        if codebook.shape != (args.vocab, dim):
            raise SystemExit(f'tokenizer.py: {args.codebook}/codebook.npy is {list(codebook.shape)}'
                             f', these features need [{args.vocab}, {dim}]: fit it again')
        meta = read_meta(args.codebook)
        fit = {k: meta[k] for k in ('sample', 'iters', 'seed', 'features_fitted', 'inertia')
               if k in meta}
    mine = torch.arange(d.rank, len(dataset), d.world_size)  # this rank's images
    loader = training.eval_loader(data.IndexedDataset(dataset), args.batch_size, args.workers, d)
    batches = partial(patch_features, loader, features_of)  # desc -> a pass over them
    if codebook is None:
        codebook, fit = fit_codebook(args, batches('features'), mine, dim, d.device)
    rows, tokens = tokenize_images(batches('tokens'), codebook.to(d.device), args.grid, d.device)
    meta = None if d.rank else write_token_files(args, len(dataset), rows, tokens, codebook, fit,
                                               image_size, time.time() - start)
    if d.world_size > 1:
        dist.barrier()  # the files exist for every rank
    if created:
        training.cleanup_distributed()
    return meta


def ensure_demo_tokens(out, split, device, codebook=None):
    """Makes the demo's HOG tokens in `out` on first use, so stages need no tokenizer command."""
    if not os.path.isfile(os.path.join(out, 'tokens.npy')):
        argv = ['--data', 'demo', '--split', split, '--out', out,
                *(['--codebook', codebook] if codebook else ['--features', 'hog'])]
        training.print0(f'no demo {split} tokens in {out}: making them first '
                        f'({shlex.join(["python", "tokenizer.py", *argv])})')
        main([*argv, '--device', str(device)])


if __name__ == '__main__':
    main()
