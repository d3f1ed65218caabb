"""k-CLIP: the visual tokenizer of MaPeT, as a command (paper Sec. 4.2).

Every image is cut into the G x G patches the ViT will see; each patch gets one feature (the
CLIP ResNet's last convolutional stage, `layer4`, before attention pooling, at input 32*G px so
its stride-32 grid is G x G); k-means on a random fraction of all features (paper: 10%, K=8192)
gives a codebook, and a patch's token is the index of its nearest centroid.

    python tokenizer.py --data demo --split train --out runs/tok_train                # offline, ~1 min on a CPU
    python tokenizer.py --data demo --split val --codebook runs/tok_train --out runs/tok_val
    python tokenizer.py --data /path/imagenet --split train --out tokens/in1k_rn50     # RN50, 14x14, K=8192
    torchrun --nproc_per_node=8 tokenizer.py --data /path/imagenet --split train --clip RN50x64 \\
        --out tokens/in1k_rn50x64                                                      # the paper's tokenizer
    torchrun --nproc_per_node=8 tokenizer.py --data /path/imagenet --split val \\
        --codebook tokens/in1k_rn50x64 --out tokens/in1k_rn50x64_val

Writes <out>/tokens.npy (uint16 [num_images, G, G], row i = dataset index i), codebook.npy
(float32 [K, C]) and meta.json (read back by data.load_tokens). `--features pixels` clusters the
raw pixels of each ViT patch instead (no CLIP weights needed): the image goes through the same
data.pretrain_geometry at patch*G px that pre-training uses, and the feature of token (i, j) is
the 3 x patch x patch block of that image which the ViT embeds as patch (i, j), flattened in
(channel, row, column) order and normalised with IMAGENET_MEAN / IMAGENET_STD as the ViT input is.

Under torchrun every rank extracts the features of its share of the images; k-means all-reduces
its sums and counts, so N processes fit one codebook, the same as one process up to float error
(which features are sampled depends only on their global ids). Rank 0 writes the files. From
Python: `tokenizer.main(['--data', 'demo', '--split', 'train', '--out', dir])`, on every rank.

Shape letters: B batch, G grid side, C feature dim, K vocabulary (number of centroids).
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from torchvision import transforms
from tqdm import tqdm

import clip_model
import data

# ----------------------------------------------------------------------------------------------
# Distributed plumbing: everything below also runs as a single process.


def world():
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(t):
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


def all_gather_cat(t):
    """Concatenate every rank's `t` (rows may differ in number) in rank order, on every rank."""
    if world()[1] == 1:
        return t
    n = torch.tensor([len(t)], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world()[1])]
    dist.all_gather(sizes, n)
    padded = t.new_zeros((int(max(sizes)), *t.shape[1:]))
    padded[:len(t)] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s)] for p, s in zip(parts, sizes)])


def id_uniform(ids, seed, stream):
    """A number in [0, 1) per global id, a pure function of (id, seed, stream) (splitmix64 hash).

    Choosing the sampled features by id, rather than drawing from a generator as batches arrive,
    makes the choice independent of batch size, worker count and the number of ranks.
    """
    key = np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0]
    z = ids.cpu().numpy().astype(np.uint64) ^ key
    with np.errstate(over='ignore'):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) / 2.0 ** 53)


# ----------------------------------------------------------------------------------------------
# k-means in torch: chunked (bounded memory at K=8192, C=4096), any device, across ranks.


def assign(x, centroids, chunk=None):
    """Nearest centroid of every row of x [n, C]: (index int64 [n], squared distance float32 [n]).

    Rows go through in blocks so the [rows, K] distance block stays ~256 MB (8192 rows at K=8192),
    on the centroids' device, in float32 whatever the dtype of x.
    """
    c = centroids.float()
    c2 = (c * c).sum(1)                                                   # [K]
    chunk = chunk or max(1, 2 ** 26 // len(c))
    index, dist2 = [], []
    for xb in x.split(chunk):
        xb = xb.to(c.device, torch.float32)
        d, i = torch.addmm(c2, xb, c.T, alpha=-2).min(1)                  # [rows, K]: |c|^2 - 2 x.c, min over K
        index.append(i)
        dist2.append(d.add_((xb * xb).sum(1)).clamp_min_(0))              # + |x|^2 = |x - c|^2
    return torch.cat(index), torch.cat(dist2)


def kmeans_plusplus(x, k, generator):
    """Greedy k-means++ (Arthur & Vassilvitskii 2007, as scikit-learn does it): each new centroid
    is the best, by resulting inertia, of 2 + ln(k) candidates drawn with probability ~ D(x)^2."""
    n, trials = len(x), 2 + int(math.log(k))
    x2 = (x * x).sum(1)
    d2_to = lambda rows: torch.addmm(x2[rows], x, x[rows].T, alpha=-2).add_(x2[:, None]).clamp_min_(0)  # [n, rows]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    closest = d2_to(chosen[:1])[:, 0]                                     # [n] distance^2 to the nearest chosen
    for _ in range(1, k):
        cumulative = torch.cumsum(closest.double(), 0)
        u = torch.rand(trials, generator=generator, dtype=torch.float64).to(x.device) * cumulative[-1]
        candidates = torch.searchsorted(cumulative, u).clamp_max_(n - 1)
        d = torch.minimum(closest[:, None], d2_to(candidates))            # [n, trials]
        best = int(d.sum(0).argmin())
        closest = d[:, best]
        chosen.append(int(candidates[best]))
    return x[chosen]


def kmeans(x, k, iters=20, seed=0, init='k-means++', ids=None, init_points=65536, device=None, progress=False):
    """Lloyd's k-means on the rows of x [n, C] (this rank's share): (centroids float32 [K, C], inertia).

    inertia[t] is the sum of squared distances to the nearest centroid before update t, and
    inertia[iters] after the last one (what scikit-learn calls `inertia_`). `init`: 'k-means++'
    run on rank 0 over about max(init_points, 16 K) points picked by global id, then broadcast;
    or a [K, C] tensor. A centroid left without points is moved to the point farthest from its
    centroid (as scikit-learn does). Under torch.distributed, `ids` are the global ids of x's rows
    (unique across ranks), so the result does not depend on how the rows are spread over ranks.
    """
    rank, world_size = world()
    device = torch.device(device) if device is not None else x.device
    if ids is None:
        if world_size > 1:
            raise ValueError('kmeans under torch.distributed needs the global ids of the rows')
        ids = torch.arange(len(x))
    n_total = int(all_reduce_sum(torch.tensor([len(x)], device=device)))
    if n_total < k:
        raise ValueError(f'cannot fit {k} centroids to {n_total} points: lower the vocabulary or sample more')
    if isinstance(init, torch.Tensor):
        centroids = init.to(device, torch.float32).clone()
    else:
        keep = id_uniform(ids, seed, stream=1) < max(init_points, 16 * k) / n_total
        subset = all_gather_cat(x[keep.to(x.device)].to(device, torch.float32))
        subset = subset[all_gather_cat(ids[keep.to(ids.device)].to(device)).argsort()]  # id order, any layout
        centroids = torch.empty(k, x.shape[1], device=device)
        if rank == 0:
            centroids = kmeans_plusplus(subset, k, torch.Generator().manual_seed(seed))
        if world_size > 1:
            dist.broadcast(centroids, 0)
        del subset
    inertia = []
    for step in tqdm(range(iters + 1), desc='k-means', disable=not progress or rank != 0):
        sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=device)
        counts = torch.zeros(k, dtype=torch.float64, device=device)
        dist2 = []
        for xb in x.split(max(1, 2 ** 26 // k)):
            xb = xb.to(device, torch.float32)
            index, d = assign(xb, centroids)
            sums.index_add_(0, index, xb.double())
            counts += torch.bincount(index, minlength=k)
            dist2.append(d)
        dist2 = torch.cat(dist2)
        inertia.append(float(all_reduce_sum(dist2.double().sum())))
        if step == iters:                                                 # the final inertia only
            break
        all_reduce_sum(sums)
        all_reduce_sum(counts)
        empty = (counts == 0).nonzero()[:, 0]
        centroids = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centroids).float()
        if len(empty):
            # Re-seed each empty cluster with one of the points farthest from their centroids:
            # every rank offers its farthest rows, all ranks agree on the global top (ties by id).
            far = dist2.topk(min(len(empty), len(dist2))).indices
            cand_d2, cand_ids = all_gather_cat(dist2[far]), all_gather_cat(ids[far.to(ids.device)].to(device))
            cand_x = all_gather_cat(x[far.to(x.device)].to(device, torch.float32))
            by_id = cand_ids.argsort()
            order = by_id[torch.sort(-cand_d2[by_id], stable=True).indices][:len(empty)]
            centroids[empty[:len(order)]] = cand_x[order]
    return centroids, inertia


# ----------------------------------------------------------------------------------------------
# Features: one C-dim vector per ViT patch, [B, G, G, C].


def pixel_features(images, patch):
    """[B, 3, patch*G, patch*G] normalised images -> [B, G, G, 3*patch*patch], the ViT's patches."""
    B, _, S, _ = images.shape
    G = S // patch
    x = images.reshape(B, 3, G, patch, G, patch).permute(0, 2, 4, 1, 3, 5)  # [B, G, G, 3, p, p]
    return x.reshape(B, G, G, 3 * patch * patch)


def clip_features(model, images):
    """[B, 3, 32G, 32G] CLIP-normalised images -> layer4 map [B, G, G, C] (Sec. 4.2)."""
    with torch.no_grad(), torch.autocast('cuda', torch.float16, enabled=images.is_cuda):
        f = model.encode_dense(images)                                    # [B, C, G, G]
    return f.float().permute(0, 2, 3, 1)


def feature_pipeline(args, device):
    """(image transform, images -> features [B, G, G, C], image size) for args.features."""
    if args.features == 'clip':
        size = 32 * args.grid                                             # layer4 has stride 32
        model = clip_model.load(args.clip, device)
        mean, std, fn = clip_model.IMAGE_MEAN, clip_model.IMAGE_STD, lambda x: clip_features(model, x)
    else:
        size = args.patch * args.grid
        mean, std, fn = data.IMAGENET_MEAN, data.IMAGENET_STD, lambda x: pixel_features(x, args.patch)
    transform = transforms.Compose([data.pretrain_geometry(size), transforms.ToTensor(),
                                    transforms.Normalize(mean, std)])
    return transform, fn, size


# ----------------------------------------------------------------------------------------------
# The command.


def get_args_parser():
    p = argparse.ArgumentParser('tokenizer.py', description='k-CLIP visual tokenizer (paper Sec. 4.2): fit a '
                                'codebook by k-means on patch features, write every image\'s G x G tokens.')
    g = p.add_argument_group('data')
    g.add_argument('--data', default='demo', help='demo | an ImageFolder root with train/ and val/ | '
                   + ' | '.join(data.TORCHVISION_DATASETS) + ' [default: demo]')
    g.add_argument('--split', default='train', choices=data.SPLITS,
                   help='fit on train, then tokenize val with --codebook [default: train]')
    g.add_argument('--data-root', default='data', help='where torchvision datasets are downloaded [default: data]')
    g.add_argument('--out', required=True, help='directory for tokens.npy, codebook.npy and meta.json')
    g = p.add_argument_group('features (with --data demo: pixels, grid 8, patch 4; with --codebook: the codebook\'s)')
    g.add_argument('--features', choices=('clip', 'pixels'),
                   help='clip: CLIP layer4 features, the paper; pixels: raw ViT patch pixels, no weights '
                   '[default: clip]')
    g.add_argument('--clip', help='CLIP ResNet name (RN50, RN101, RN50x4, RN50x16, RN50x64) or checkpoint path; '
                   'paper: RN50x64 [default: RN50]')
    g.add_argument('--grid', type=int, help='tokens per side G (CLIP input 32*G px); paper: 14 [default: 14]')
    g.add_argument('--patch', type=int, help='pixels only: the ViT patch size, image patch*G px [default: 16]')
    g = p.add_argument_group('k-means (with --data demo: vocab 512; with --codebook: the codebook\'s)')
    g.add_argument('--vocab', type=int, help='codebook size K; paper: 8192 [default: 8192]')
    g.add_argument('--sample', type=float, help='fraction of all features used to fit; paper: 0.1 [default: 0.1]')
    g.add_argument('--iters', type=int, help='Lloyd iterations; paper: 20 [default: 20]')
    g.add_argument('--seed', type=int, help='seeds the feature sample and the k-means++ init [default: 0]')
    g.add_argument('--codebook', help='token dir of a fitted codebook: only assign tokens (e.g. the val split)')
    g = p.add_argument_group('run')
    g.add_argument('--batch-size', type=int, help='images per batch per process; RN50x64 at 448 px on a 16 GB '
                   'GPU: 16 [default: 64; demo: 500]')
    g.add_argument('--workers', type=int, help='data loader processes per rank [default: min(8, CPUs); demo: 0]')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                   help='cpu | cuda (under torchrun: cuda:LOCAL_RANK) [default: cuda if there is one]')
    return p


def read_meta(token_dir):
    with open(os.path.join(token_dir, 'meta.json')) as f:
        return json.load(f)


FIT_KEYS = ('sample', 'iters', 'seed', 'features_fitted', 'inertia')   # how a codebook was fitted


def resolve_args(args):
    """Fill the defaults that depend on --data and --codebook; refuse contradictions."""
    demo = args.data == 'demo'
    if args.codebook:
        if not os.path.isfile(os.path.join(args.codebook, 'codebook.npy')):
            raise ValueError(f'--codebook {args.codebook} holds no codebook.npy: fit one first with '
                             f'`python tokenizer.py --data {args.data} --split train --out {args.codebook}`')
        if os.path.realpath(args.out) == os.path.realpath(args.codebook):
            raise ValueError(f'--out {args.out} is the --codebook dir: its tokens would be overwritten')
        meta = read_meta(args.codebook)
        kind, _, name = meta['features'].partition(':')
        fixed = dict(features=kind, clip=name or None, grid=meta['grid'], vocab=meta['vocab_size'],
                     patch=meta['image_size'] // meta['grid'] if kind == 'pixels' else None,
                     sample=meta['sample'], iters=meta['iters'], seed=meta['seed'])
        for key, value in fixed.items():
            if getattr(args, key) is not None and getattr(args, key) != value:
                raise ValueError(f'--{key} {getattr(args, key)} does not match the codebook in {args.codebook} '
                                 f'({key} {value}): drop --{key} or fit a new codebook')
            setattr(args, key, value)
    defaults = dict(features='pixels' if demo else 'clip', grid=8 if demo else 14, vocab=512 if demo else 8192,
                    sample=0.1, iters=20, seed=0, batch_size=500 if demo else 64,
                    workers=0 if demo else min(8, os.cpu_count() or 1))
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.features == 'clip':
        if args.patch is not None:
            raise ValueError('--patch applies to --features pixels; CLIP features are taken at 32*G px')
        args.clip = args.clip or 'RN50'
    else:
        if args.clip is not None:
            raise ValueError('--clip applies to --features clip')
        args.patch = args.patch or (4 if demo else 16)
    if not 0 < args.sample <= 1:
        raise ValueError(f'--sample {args.sample} is not in (0, 1]: it is the fraction of features to fit on')
    if not 1 <= args.vocab <= 65536:
        raise ValueError(f'--vocab {args.vocab} is not in 1..65536 (tokens are stored as uint16)')
    if min(args.grid, args.patch or 1, args.batch_size) < 1 or min(args.iters, args.workers) < 0:
        raise ValueError('--grid, --patch and --batch-size must be >= 1, --iters and --workers >= 0')
    return args


def setup(device):
    """Join torchrun's process group if launched by torchrun; returns (device, whether we created it)."""
    created = False
    if 'RANK' in os.environ and not dist.is_initialized():
        if device.startswith('cuda'):
            torch.cuda.set_device(int(os.environ['LOCAL_RANK']))
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
        created = True
    if device == 'cuda' and world()[1] > 1:
        device = f'cuda:{os.environ.get("LOCAL_RANK", 0)}'
    return torch.device(device), created


def main(argv=None):
    """Run the command; returns meta (the dict written to meta.json) on rank 0, None elsewhere."""
    args = get_args_parser().parse_args(argv)
    try:
        args = resolve_args(args)
        dataset = data.build_dataset(args.data, args.split, args.data_root)
    except (ValueError, OSError) as e:
        raise SystemExit(f'tokenizer.py: {e}') from None
    device, created = setup(args.device)
    rank, world_size = world()
    say = print if rank == 0 else (lambda *a, **k: None)
    say(' '.join(f'{k}={v}' for k, v in sorted(vars(args).items())))
    start = time.time()

    transform, features_of, image_size = feature_pipeline(args, device)
    dataset.transform = transform
    G, K, n = args.grid, args.vocab, len(dataset)
    mine = torch.arange(rank, n, world_size)                              # this rank's image indices
    loader = DataLoader(Subset(data.IndexedDataset(dataset), mine.tolist()), batch_size=args.batch_size,
                        num_workers=args.workers, collate_fn=data.collate_skip, pin_memory=device.type == 'cuda',
                        persistent_workers=args.workers > 0)              # one warning per bad file

    def batches(desc):
        """(image indices [B], features [B*G*G, C]) of every readable image of this rank."""
        for batch in tqdm(loader, desc=desc, disable=rank != 0):
            if batch is None:                                             # every image unreadable
                continue
            index, images, _ = batch
            f = features_of(images.to(device, non_blocking=True))         # [B, G, G, C]
            if f.shape[1:3] != (G, G):
                raise SystemExit(f'tokenizer.py: features come as a {f.shape[1]}x{f.shape[2]} grid, not {G}x{G}')
            yield index, f.reshape(-1, f.shape[-1])

    if args.codebook:
        codebook = torch.from_numpy(np.load(os.path.join(args.codebook, 'codebook.npy'))).to(device)
        fit = {k: read_meta(args.codebook)[k] for k in FIT_KEYS}
    else:
        # Sec. 4.2: fit on a random `sample` fraction of all features, picked by global id
        # (image index * G^2 + position), so the same ones on any number of ranks.
        def sampled(index):                                               # [B] -> bool [B * G*G]
            ids = (index[:, None] * G * G + torch.arange(G * G)).reshape(-1)
            return ids, id_uniform(ids, args.seed, stream=0) < args.sample
        n_mine = sum(int(sampled(c)[1].sum()) for c in mine.split(65536))
        n_fit = int(all_reduce_sum(torch.tensor([n_mine], device=device)))
        if n_fit < K:
            raise SystemExit(f'tokenizer.py: --vocab {K} is more than the {n_fit} sampled features: '
                             f'lower --vocab or raise --sample')
        # Kept in host memory (float16 when extracted on a GPU): 25M x 4096 for RN50x64 on ImageNet.
        fit_x, fit_ids, filled = None, None, 0
        for index, f in batches('features'):
            ids, keep = sampled(index)
            if fit_x is None:
                fit_x = torch.empty(n_mine, f.shape[1], dtype=torch.float16 if device.type == 'cuda' else torch.float32)
                fit_ids = torch.empty(n_mine, dtype=torch.int64)
            m = int(keep.sum())
            fit_x[filled:filled + m] = f[keep.to(device)].cpu()
            fit_ids[filled:filled + m] = ids[keep]
            filled += m
        if fit_x is None:
            fit_x, fit_ids = torch.empty(0, 0), torch.empty(0, dtype=torch.int64)
        try:
            codebook, inertia = kmeans(fit_x[:filled], K, args.iters, args.seed, ids=fit_ids[:filled],
                                       device=device, progress=True)
        except ValueError as e:                                           # too few readable images
            raise SystemExit(f'tokenizer.py: {e}') from None
        del fit_x, fit_ids
        fit = dict(sample=args.sample, iters=args.iters, seed=args.seed, features_fitted=n_fit, inertia=inertia)

    if codebook.shape[0] != K:
        raise SystemExit(f'tokenizer.py: {args.codebook}/codebook.npy has {codebook.shape[0]} rows, meta says {K}')
    # Assign every patch of every image its nearest centroid, then gather the rows on rank 0.
    rows = [torch.empty(0, dtype=torch.int64, device=device)]
    tokens = [torch.empty(0, G * G, dtype=torch.int32, device=device)]
    for index, f in batches('tokens'):
        if f.shape[1] != codebook.shape[1]:
            raise SystemExit(f'tokenizer.py: features have {f.shape[1]} dims, the codebook {codebook.shape[1]}')
        rows.append(index.to(device))
        tokens.append(assign(f, codebook)[0].reshape(-1, G * G).int())
    rows, tokens = all_gather_cat(torch.cat(rows)), all_gather_cat(torch.cat(tokens))

    meta = None
    if rank == 0:
        out = np.zeros((n, G, G), dtype=np.uint16)
        out[rows.cpu().numpy()] = tokens.cpu().numpy().reshape(-1, G, G)
        skipped = sorted(set(range(n)) - set(rows.tolist()))
        counts = np.bincount(tokens.cpu().numpy().ravel(), minlength=K)
        p = counts[counts > 0] / counts.sum()
        perplexity = float(np.exp(-(p * np.log(p)).sum())) if counts.sum() else 0.0
        features = f'clip:{args.clip}' if args.features == 'clip' else 'pixels'
        meta = dict(dataset=data.dataset_id(args.data), split=args.split, num_images=n, grid=G, vocab_size=K,
                    features=features, feature_dim=int(codebook.shape[1]), image_size=image_size, **fit,
                    codebook_from=os.path.realpath(args.codebook) if args.codebook else None,
                    skipped=skipped, tokens_used=int((counts > 0).sum()), perplexity=perplexity,
                    world_size=world_size, seconds=round(time.time() - start, 1))
        data.write_tokens(args.out, out, codebook.cpu().numpy(), meta)
        say(f'images {n} ({len(skipped)} unreadable, skipped), features {features} dim {meta["feature_dim"]} '
            f'at {image_size} px, grid {G}x{G}')
        if not args.codebook:
            say(f'k-means on {n_fit} sampled features, inertia per iteration: '
                + ' '.join(f'{v:.4g}' for v in inertia))
        say(f'codebook usage {meta["tokens_used"]}/{K} tokens, perplexity {perplexity:.1f}, '
            f'{meta["seconds"]:.1f} s -> {args.out}')
    if world_size > 1:
        dist.barrier()                                                    # files exist for every rank
    if created:
        dist.destroy_process_group()
    return meta



def ensure_demo_tokens(out, split, device, codebook=None):
    """Make the demo's pixel tokens in `out` on the first run (~20 s on a CPU): pretrain.py and
    probe.py call it, so the quick start needs no tokenizer command of its own."""
    if os.path.isfile(os.path.join(out, 'tokens.npy')):
        return
    fit = ['--codebook', codebook] if codebook else ['--features', 'pixels']
    if world()[0] == 0:
        print(f'no demo {split} tokens in {out}: making them first (python tokenizer.py --data demo '
              f'--split {split} {" ".join(fit)} --out {out})')
    main(['--data', 'demo', '--split', split, *fit, '--out', out, '--device', device.type])


if __name__ == '__main__':
    main()
