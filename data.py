"""Datasets, the pre-training geometry and the token files: where every stage gets its images.

Sec. 4.2: k-CLIP tokens are computed once per image and stored; Sec. 5.1: pre-training uses only
colour jitter "to preserve image patch positions corresponding to the pre-extracted visual
tokens", so the tokenizer and pre-training cut images with the one pretrain_geometry.

    import data
    ds = data.build_dataset('demo', 'train', transform=...)   # (image, label) pairs, ds.classes
    tokens, meta = data.load_tokens('runs/tok_train', 'demo', 'train', len(ds), grid=8)
    pairs = data.TokenizedDataset(ds, tokens, meta['skipped'])  # (image, tokens [G*G] int64)

A user mistake (unknown name, missing folder, no network, wrong token file) is a one-line
ValueError.
"""
import argparse
import contextlib
import hashlib
import itertools
import json
import os
import time
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate
from torchvision import datasets, transforms
from tqdm import tqdm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SPLITS = ('train', 'val')


def pretrain_geometry(size):
    """Short side to `size`, centre crop (Sec. 5.1); the tokenizer cuts at 32*G px (CLIP's
    stride), pre-training at patch*G px: token (i, j) describes patch (i, j)."""
    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(size),
    ])


def eval_transform(img_size, eval_crop):
    """BEiT's eval_crop: 224/256 = 0.875."""
    return transforms.Compose([
        transforms.Resize(int(img_size / eval_crop),
                          interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


# Fine-tuning and probing crops: the paper's (BEiT / timm), the demo's (8 % of 32 px: no shape)
PAPER_CROPS = dict(crop_scale=0.08, eval_crop=0.875)
DEMO_CROPS = dict(crop_scale=0.35, eval_crop=1.0)
DEMO_TOKENS = os.path.join('runs', 'tokens', 'demo_hog')  # made by tokenizer.py on first use


# The built-in demo set: 32 px images of 10 shapes, generated from (split, index, seed).

DEMO_CLASSES = ('disc', 'ring', 'square', 'diamond', 'triangle', 'cross', 'stripes',
                'checkerboard', 'two_blobs', 'crescent')
DEMO_SIZES = {'train': 10000, 'val': 1000}
_DEMO_PX = 32
_Y, _X = (np.mgrid[0:_DEMO_PX, 0:_DEMO_PX] + 0.5).astype(np.float32)  # pixel centres
_demo_cache = {}


def _shape_sdf(label, rng, u, v, r):
    """Signed distance (px, < 0 inside) of shape `label` at (u, v) off centre."""
    rho, au, av = np.hypot(u, v), np.abs(u), np.abs(v)
    if label == 0:
        return rho - r
    if label == 1:
        return np.abs(rho - 0.8 * r) - rng.uniform(1.2, 2.2)
    if label in (2, 3):  # the same box, turned 0 / 45 degrees
        t = rng.uniform(-0.25, 0.25) + (np.pi / 4 if label == 3 else 0.0)
        a, b = u * np.cos(t) + v * np.sin(t), v * np.cos(t) - u * np.sin(t)
        return np.maximum(np.abs(a), np.abs(b)) - 0.75 * r
    if label == 4:
        t = rng.uniform(0, 2 * np.pi) + np.arange(3)[:, None, None] * 2 * np.pi / 3
        return (u * np.cos(t) + v * np.sin(t)).max(0) - 0.5 * r
    if label == 5:
        w = 0.3 * r
        return np.minimum(np.maximum(au - r, av - w), np.maximum(au - w, av - r))
    if label == 6:
        t, period = rng.uniform(0, np.pi), rng.uniform(3.0, 5.0)
        stripes = np.sin(2 * np.pi * (u * np.cos(t) + v * np.sin(t)) / period)
        return np.maximum(rho - r, -stripes * period / 4)
    if label == 7:
        cell = rng.uniform(2.5, 4.0)
        checks = np.sin(np.pi * u / cell) * np.sin(np.pi * v / cell)
        return np.maximum(np.maximum(au, av) - 0.8 * r, -checks * cell)
    t = rng.uniform(0, 2 * np.pi)
    du, dv = np.cos(t), np.sin(t)
    if label == 8:
        d = 0.6 * r
        return np.minimum(np.hypot(u - d * du, v - d * dv), np.hypot(u + d * du, v + d * dv)) - r/2
    return np.maximum(rho - r, 0.85 * r - np.hypot(u - 0.5 * r * du, v - 0.5 * r * dv))


def render_demo_image(split, index, seed=0):
    """uint8 [32, 32, 3] and its label; all but the shape is random."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    label = index % len(DEMO_CLASSES)
    bg = rng.uniform(0, 1, 3).astype(np.float32)
    fg = rng.uniform(0, 1, 3).astype(np.float32)
    if np.abs(fg - bg).max() < 0.4:  # keep the shape visible
        fg = np.where(bg > 0.5, bg - rng.uniform(0.4, 0.5, 3), bg + rng.uniform(0.4, 0.5, 3))
    g, w = rng.normal(size=2), rng.uniform(-1, 1, 2)
    ramp = (g[0] * (_X - 16) + g[1] * (_Y - 16)) / 32
    wave = np.sin(w[0] * _X + w[1] * _Y + rng.uniform(0, 2 * np.pi))
    img = (bg + ramp[..., None] * rng.uniform(-0.3, 0.3, 3)
           + wave[..., None] * rng.uniform(0, 0.08, 3))
    r = rng.uniform(6.0, 10.0)
    cx, cy = rng.uniform(r * 0.8 + 1, _DEMO_PX - r * 0.8 - 1, 2)
    sdf = _shape_sdf(label, rng, _X - cx, _Y - cy, r)
    alpha = np.clip(0.5 - sdf, 0, 1)[..., None]  # 1 px anti-aliased edge
    noise = rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(0, 0.06)
    img = img * (1 - alpha) + fg * alpha + noise
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label


class DemoDataset(Dataset):
    """Rendered once per process (15 MB)."""

    classes = list(DEMO_CLASSES)

    def __init__(self, split, seed=0, transform=None):
        self.transform = transform
        if (split, seed) not in _demo_cache:
            images, labels = zip(*(render_demo_image(split, i, seed)
                                   for i in range(DEMO_SIZES[split])))
            _demo_cache[split, seed] = np.stack(images), np.array(labels)
        self.images, self.labels = _demo_cache[split, seed]  # [N, 32, 32, 3] uint8, [N]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), int(self.labels[i])


# Image folders (ImageNet layout), torchvision sets.

_warned_paths = set()


class ImageFolder(datasets.ImageFolder):
    """An unreadable file gives None (listed in .skipped), not an exception that kills a long run
    for one bad JPEG."""

    def __init__(self, root, transform=None):
        super().__init__(root, transform=transform)
        self.skipped = set()

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            img = self.loader(path)  # convert('RGB') decodes fully
        except (OSError, SyntaxError) as e:  # truncated / not an image / broken PNG
            self.skipped.add(i)
            if path not in _warned_paths:
                _warned_paths.add(path)
                warnings.warn(f'skipping unreadable image {path} ({type(e).__name__}: {e})')
            return None
        return (self.transform(img) if self.transform else img), label


# name -> (constructor, its arguments for our train / val split, folder)
TRAIN, TEST = dict(train=dict(train=True), val=dict(train=False)), dict(
    train=dict(split='train'), val=dict(split='test'))
TORCHVISION_DATASETS = {
    'cifar10': (datasets.CIFAR10, TRAIN, 'cifar-10-batches-py'),
    'cifar100': (datasets.CIFAR100, TRAIN, 'cifar-100-python'),
    'stl10': (datasets.STL10, TEST, 'stl10_binary'),
    'food101': (datasets.Food101, TEST, 'food-101'),
    'stanford_cars': (datasets.StanfordCars, TEST, 'stanford_cars'),  # no download: the URL is gone
    'fgvc_aircraft': (datasets.FGVCAircraft, dict(TEST, train=dict(split='trainval')),
                      'fgvc-aircraft-2013b'),
}


def build_dataset(name, split, root='data', transform=None):
    if split not in SPLITS:
        raise ValueError(f'unknown split {split!r}: use one of {SPLITS}')
    if name == 'demo':
        return DemoDataset(split, transform=transform)
    if name in TORCHVISION_DATASETS:
        ctor, split_args, folder = TORCHVISION_DATASETS[name]
        download = name != 'stanford_cars'
        try:
            return ctor(root, **split_args[split], transform=transform, download=download)
        except Exception as e:  # offline, a dead URL, a torn archive
            cause, where = (str(e).strip().splitlines() or [''])[0], os.path.join(root, folder)
            how = ('download it by hand (e.g. from Kaggle) and unpack it' if not download else
                   'on a machine with internet run `python -c "import torchvision; torchvision.'
                   f'datasets.{ctor.__name__}(\'data\', download=True)"` and copy the result')
            raise ValueError(f'cannot load {name} from {where} ({type(e).__name__}: {cause}): '
                             f'{how} so that {where} exists, or point --data-root at its parent'
                             ) from None
    if os.path.isdir(name):
        folder = os.path.join(name, split)
        if not os.path.isdir(folder):
            raise ValueError(f'{name} has no {split}/ folder: expected the ImageFolder layout '
                             f'{name}/{{train,val}}/<class>/<image>')
        try:
            return ImageFolder(folder, transform=transform)
        except FileNotFoundError as e:
            raise ValueError(f'{folder}: {e}') from None
    raise ValueError(f'unknown dataset {name!r}: use demo, an ImageFolder directory (with train/ '
                     f'and val/ inside), or one of {", ".join(TORCHVISION_DATASETS)}')


def dataset_id(name):
    return name if name == 'demo' or name in TORCHVISION_DATASETS else os.path.realpath(name)


# Seeded sampling: the loader yields (epoch, index) keys, so every random draw a sample meets is
# a function of (seed, epoch, index): the same on any number of processes.


def seed_for(*keys):
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0])


@contextlib.contextmanager
def keyed(*keys):
    """Seeded by the keys inside; the process's stream untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed_for(*keys))
        yield


def per_sample(draw, epochs, indices, seed, key):
    """Each sample's draw(1) under keyed(seed, epoch, index, key), whatever its batch."""
    rows = []
    for epoch, i in zip(epochs.tolist(), indices.tolist()):
        with keyed(seed, epoch, i, key):
            rows.append(draw(1))
    return torch.cat(rows)


class EpochSampler(DistributedSampler):
    """DistributedSampler's (seed, epoch) shuffle as (epoch, index) keys: `per_epoch` of them
    (whole steps), after skipping `skip` (resume)."""

    def __init__(self, dataset, world_size, rank, seed, per_epoch):
        super().__init__(dataset, num_replicas=world_size, rank=rank, seed=seed, drop_last=True)
        self.per_epoch, self.skip = per_epoch, 0

    def __iter__(self):
        indices = itertools.islice(super().__iter__(), self.skip, self.per_epoch)
        return ((self.epoch, i) for i in indices)

    def __len__(self):
        return self.per_epoch - self.skip


class SeededSet(Dataset):
    """dataset[index] for EpochSampler's key (epoch, index), its random transform drawn under
    keyed(seed, epoch, index, 0): the same in any worker, on any rank, after a resume."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        with keyed(self.seed, epoch, i, 0):
            return self.dataset[i]


class KeyedSet(SeededSet):
    """(epoch, index, *item, *drawn): drawn[j] = draw(1)[0] under keyed(seed, epoch, index, key)
    for the j-th (key, draw) of `draws`: a sample's other randomness, drawn in the loader's
    workers, off the training process."""

    def __init__(self, dataset, seed, draws=()):
        super().__init__(dataset, seed)
        self.draws = list(draws)

    def __getitem__(self, key):
        item = super().__getitem__(key)
        if item is None:
            return None
        drawn = []
        for k, draw in self.draws:
            with keyed(self.seed, *key, k):
                drawn.append(draw(1)[0])
        return (*key, *item, *drawn)


# Wrappers and the collate function every DataLoader uses.

def collate_skip(batch):
    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None


class IndexedDataset(Dataset):
    """(index, image, label): which rows survived collate_skip."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return None if item is None else (i, *item)


class TokenizedDataset(Dataset):
    """(image, tokens int64 [G*G], raster order); `skipped`: images the tokenizer could not read,
    dropped even if readable since."""

    def __init__(self, dataset, tokens, skipped=()):
        if len(dataset) != len(tokens):
            raise ValueError(f'the token file has {len(tokens)} rows but the dataset has '
                             f'{len(dataset)} images: re-run tokenizer.py for this split')
        self.dataset, self.tokens, self.skipped = dataset, tokens, set(skipped)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = None if i in self.skipped else self.dataset[i]
        if item is None:
            return None
        return item[0], torch.from_numpy(self.tokens[i].astype(np.int64).reshape(-1))  # [G*G]


# Token files: <dir>/tokens.npy (uint16 [images, G, G]), codebook.npy (float32 [K, C]), meta.json.


def write_atomic(path, write):
    """write(f) into path.tmp, then rename: a kill never leaves a torn file."""
    with open(path + '.tmp', 'wb') as f:
        write(f)
    os.replace(path + '.tmp', path)


def write_tokens(out_dir, tokens, codebook, meta):
    os.makedirs(out_dir, exist_ok=True)
    for name, write in (('tokens.npy', lambda f: np.save(f, tokens.astype(np.uint16))),
                        ('codebook.npy', lambda f: np.save(f, codebook.astype(np.float32))),
                        ('meta.json', lambda f: f.write(json.dumps(meta, indent=1).encode()))):
        write_atomic(os.path.join(out_dir, name), write)


def load_tokens(token_dir, dataset_name, split, num_images, grid, vocab_size=None, patch=None):
    """Memory-mapped tokens and meta.json, checked against this run (pixel and HOG tokens must be
    cut at the ViT's `patch`)."""
    npy, js = (os.path.join(token_dir, f) for f in ('tokens.npy', 'meta.json'))

    def fix(meta, out=token_dir):  # from this run's settings: pasted, it makes the run pass
        command = f'python tokenizer.py --data {dataset_name} --split {split}'
        if split != 'train':
            command += f" --out {out} --codebook <the train split's token dir>"
        else:
            features = meta.get('features', 'hog' if dataset_name == 'demo' else 'clip')
            kind, _, name = features.partition(':')  # e.g. clip:RN50, vqkd:<its name or file>
            cut = f' --features {features}' + (f' --patch {patch}' if patch else '')
            cut = {'clip': '', 'vqkd': f' --features vqkd --vqkd {name}'}.get(kind, cut)
            command += f' --grid {grid}{cut} --out {out}'
        return f'run `{command}`' + ('' if out == token_dir else f' and pass --tokens {out}')
    for path in (npy, js):
        if not os.path.isfile(path):
            raise ValueError(f'no token file {path}: {fix({})}')
    try:
        with open(js) as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f'{js} is not valid JSON ({e}): {fix({})}') from None
    other = os.path.normpath(token_dir) + '_' + (  # never overwrite the user's
        split if meta.get('split') != split else f'grid{grid}' if meta.get('grid') != grid else
        os.path.basename(os.path.normpath(dataset_name)))
    for what, ours in (('dataset', dataset_id(dataset_name)), ('split', split),
                       ('num_images', num_images), ('grid', grid), ('vocab_size', vocab_size)):
        if meta.get(what) != ours and ours is not None:
            raise ValueError(f'tokens in {token_dir} were made for {what} {meta.get(what)!r}, this '
                             f'run uses {ours!r}: {fix(meta, other)}')
    try:
        tokens = np.load(npy, mmap_mode='r')
    except (ValueError, OSError) as e:  # e.g. truncated
        raise ValueError(f'{npy} is damaged ({e}): {fix(meta)}') from None
    if tokens.dtype != np.uint16 or tokens.shape != (num_images, grid, grid):
        raise ValueError(f'{npy} holds {tokens.dtype} {tokens.shape}, meta.json says uint16 '
                         f'{(num_images, grid, grid)}: the file is damaged, {fix(meta)}')
    if tokens.size and int(tokens.max()) >= meta.get('vocab_size', 0):
        raise ValueError(f'{npy} holds token {int(tokens.max())}, outside the vocabulary of '
                         f'{meta.get("vocab_size")} in {js}: {fix(meta)}')
    return tokens, meta


# Paper scale (README "Input pipeline"): the geometry is fixed, so each image is decoded, resized
# and cropped once, into a uint8 [N, S, S, 3] memory map; pretrain.py jitters it on the device.

def fingerprint(dataset):
    """The sorted file list of an ImageFolder (empty for demo and torchvision sets)."""
    names = [os.path.relpath(path, dataset.root) for path, _ in getattr(dataset, 'samples', ())]
    return hashlib.sha256('\n'.join(names).encode()).hexdigest()[:16]


def write_image_cache(name, split, size, out_dir, root='data', workers=0):
    """<out_dir>/images.npy (uint8 [N, size, size, 3]) and images.json; returns images/s."""
    dataset = build_dataset(name, split, root, transforms.Compose([pretrain_geometry(size),
                                                                    np.array]))
    loader = DataLoader(IndexedDataset(dataset), batch_size=64, num_workers=workers,
                        collate_fn=collate_skip)
    os.makedirs(out_dir, exist_ok=True)
    path, seen, start = os.path.join(out_dir, 'images.npy'), set(), time.perf_counter()
    images = np.lib.format.open_memmap(path + '.tmp', 'w+', np.uint8, (len(dataset), size, size, 3))
    for batch in tqdm(loader, desc=f'decode {split} at {size} px', dynamic_ncols=True):
        if batch is not None:  # rows of unreadable images stay 0 and are listed as skipped
            index, pixels, _ = batch
            images[index.numpy()] = pixels.numpy()
            seen.update(index.tolist())
    images.flush()
    del images
    os.replace(path + '.tmp', path)
    meta = dict(dataset=dataset_id(name), split=split, size=size, num_images=len(dataset),
                files=fingerprint(dataset), skipped=sorted(set(range(len(dataset))) - seen))
    write_atomic(os.path.join(out_dir, 'images.json'), lambda f: f.write(json.dumps(meta).encode()))
    return len(dataset) / (time.perf_counter() - start)


class CachedImages(Dataset):
    """(uint8 crop [S, S, 3], 0) from write_image_cache's files, checked against the run."""

    def __init__(self, cache_dir, name, split, size, dataset):
        fix = (f'run `python data.py --data {name} --split {split} --size {size} --out '
               f'{cache_dir}`')
        try:
            with open(os.path.join(cache_dir, 'images.json')) as f:
                meta = json.load(f)
            # copy-on-write: writable rows for torch.from_numpy, yet never copied nor written
            self.images = np.load(os.path.join(cache_dir, 'images.npy'), mmap_mode='c')
        except (OSError, ValueError) as e:
            raise ValueError(f'no readable image cache in {cache_dir} ({e}): {fix}') from None
        ours = dict(dataset=dataset_id(name), split=split, size=size, num_images=len(dataset),
                    files=fingerprint(dataset))
        for key, value in ours.items():
            if meta.get(key) != value:
                raise ValueError(f'the image cache in {cache_dir} was made for {key} '
                                 f'{meta.get(key)!r}, this run has {value!r}: {fix}')
        if self.images.shape != (len(dataset), size, size, 3):
            raise ValueError(f'{cache_dir}/images.npy is damaged ({self.images.shape}): {fix}')
        self.skipped = set(meta['skipped'])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return None if i in self.skipped else (torch.from_numpy(self.images[i]), 0)


class SyntheticPairs(Dataset):
    """(random uint8 crop, random tokens) as many as ImageNet-1k's: --data synthetic times the
    whole loop (loader, jitter, step) without a dataset."""

    def __init__(self, size, grid, vocab_size, num_images=1_281_167, pool=64):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(256, (pool, size, size, 3), dtype=torch.uint8, generator=g)
        self.tokens = torch.randint(vocab_size, (pool, grid * grid), generator=g)
        self.num_images = num_images

    def __len__(self):
        return self.num_images

    def __getitem__(self, i):
        return self.images[i % len(self.images)], self.tokens[i % len(self.tokens)]


def draw_jitter(batch, strength):
    """torchvision's ColorJitter(strength, strength, strength).get_params per sample, in its
    order: the order of its 4 ops (3 = hue, off) and the brightness, contrast, saturation
    factors: [batch, 7]."""
    rows = []
    for _ in range(batch):
        order = torch.randperm(4).float()
        factors = [torch.empty(1).uniform_(max(0, 1 - strength), 1 + strength) for _ in range(3)]
        rows.append(torch.cat([order, *factors]))
    return torch.stack(rows)


GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def color_jitter(images, params):
    """uint8 [B, S, S, 3] -> normalised float [B, 3, S, S], per sample ColorJitter's ops in its
    drawn order. Each op is affine in the colour, so they compose into one 3x3 map and offset
    per sample, applied in one batched matmul; torchvision clamps to [0, 1] after every op, we
    once at the end: the two differ only where an intermediate value leaves [0, 1]."""
    B, S = images.shape[:2]
    x = images.permute(0, 3, 1, 2).reshape(B, 3, -1).float()  # [B, 3, P]
    eye = torch.eye(3, device=x.device)
    grey = x.new_tensor(GREY)
    A, b = eye.expand(B, 3, 3) / 255, x.new_zeros(B, 3)  # y = A x + b, in [0, 1]
    channel_mean = x.mean(2)  # [B, 3]: the mean of A x + b is A mean + b
    for k in range(4):  # the drawn order; op 3 (hue) is off
        op = params[:, k].long()
        f = params[:, 4:].gather(1, op.clamp(max=2)[:, None]).where(op[:, None] < 3, 1.0)  # [B, 1]
        contrast, saturation = (op == 1)[:, None], (op == 2)[:, None]
        # y -> f y (brightness), f y + (1 - f) mean(grey(y)) (contrast), f y + (1 - f) grey(y)
        # (saturation): y = A x + b becomes M (A x + b) + c
        M = f[..., None] * eye + (saturation * (1 - f))[..., None] * grey  # [B, 3, 3]
        mean_grey = (torch.einsum('bij,bj->bi', A, channel_mean) + b) @ grey  # [B]
        A, b = M @ A, torch.einsum('bij,bj->bi', M, b) + contrast * (1 - f) * mean_grey[:, None]
    mean, std = x.new_tensor(IMAGENET_MEAN), x.new_tensor(IMAGENET_STD)  # folded into the map
    y = torch.baddbmm(((b - mean) / std)[..., None], A / std[:, None], x)  # [B, 3, P]
    return y.clamp_((-mean / std)[:, None], ((1 - mean) / std)[:, None]).view(B, 3, S, S)


def main(argv=None):
    p = argparse.ArgumentParser(description='Decode a split once for pre-training: images.npy '
                                '(uint8 [N, S, S, 3]) and images.json, beside its tokens.npy.')
    p.add_argument('--data', required=True, help='an ImageFolder root, demo, or a torchvision set')
    p.add_argument('--split', default='train', choices=SPLITS)
    p.add_argument('--size', type=int, default=224, help="the ViT's input size [224]")
    p.add_argument('--out', required=True, help='the token directory of this split')
    p.add_argument('--data-root', default='data')
    p.add_argument('--workers', type=int, default=min(8, os.cpu_count() or 1))
    args = p.parse_args(argv)
    try:
        rate = write_image_cache(args.data, args.split, args.size, args.out, args.data_root,
                                 args.workers)
    except ValueError as e:
        raise SystemExit(f'data.py: {e}') from None
    print(f'wrote {args.out}/images.npy at {rate:.0f} images/s')


if __name__ == '__main__':
    main()
