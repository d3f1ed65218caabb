"""Datasets, the shared pre-training geometry, and the token files: where every stage gets its images.

Paper: Sec. 4.2 (k-CLIP tokens are computed once per image and stored) and Sec. 5.1 ("our
pre-training augmentation policy only includes color jittering to preserve image patch positions
corresponding to the pre-extracted visual tokens"): the tokenizer and pre-training must cut the
image with the same geometry, so this file holds the one function that does it.

    import data
    ds = data.build_dataset('demo', 'train', transform=...)   # (image, label) pairs, ds.classes
    geometry = data.pretrain_geometry(224)                     # short-side resize + centre crop
    tokens, meta = data.load_tokens('runs/tok_train', 'demo', 'train', len(ds), grid=8)
    pairs = data.TokenizedDataset(ds, tokens, meta['skipped'])  # (image, tokens [G*G] int64)
    loader = DataLoader(pairs, batch_size=64, collate_fn=data.collate_skip)

API (stable; pretrain.py, finetune.py, probe.py, tokenizer.py and visualize.py use it):
    build_dataset(name, split, root='data', transform=None) -> Dataset of (transform(PIL RGB), label)
        name: 'demo' | an ImageFolder root holding train/ and val/ | one of TORCHVISION_DATASETS
        split: 'train' | 'val' (torchvision sets: their train / test split)
    DemoDataset(split, seed=0, transform=None)   the built-in 32 px set, 10 shape classes
    num_classes(dataset)
    pretrain_geometry(size)                      the one pre-training crop (tokenizer and pretrain)
    IMAGENET_MEAN, IMAGENET_STD                  input normalisation of the ViT stages
    IndexedDataset(dataset)                      (index, image, label)
    TokenizedDataset(dataset, tokens, skipped=())  (image, tokens [G*G] int64), aligned by index
    collate_skip(batch)                          the collate_fn of every DataLoader (drops None)
    dataset_id(name)                             how a dataset is named in meta.json
    load_tokens(token_dir, dataset_name, split, num_images, grid, vocab_size=None) -> (tokens, meta)
    write_tokens(out_dir, tokens, codebook, meta)

Unreadable image files (a truncated JPEG in an ImageFolder) come back as None, are warned about
once per path per process and dropped by collate_skip, so a batch is never re-indexed. Every user
mistake (unknown name, missing folder, no network, wrong token file) raises ValueError with a
one-line message that says how to fix it.
"""
import itertools
import json
import os
import warnings

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, default_collate
from torchvision import datasets, transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SPLITS = ('train', 'val')

# ----------------------------------------------------------------------------------------------
# The shared pre-training geometry (Sec. 5.1).


def pretrain_geometry(size):
    """Resize the short side to `size` (bicubic, antialiased), then crop the centre `size` square.

    The tokenizer calls it at 32*G px (CLIP's layer4 has stride 32) and pre-training at patch*G px,
    so token (i, j) always describes the square the ViT sees as patch (i, j). No random crop or
    flip may follow it in pre-training: only colour jitter, which keeps every patch in place.
    For an image that is already size x size (the 32 px demo at size 32) it is the identity.
    """
    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(size),
    ])


def eval_transform(img_size, eval_crop):
    """Short side to img_size / eval_crop (bicubic), centre img_size crop, normalised: the
    evaluation view of fine-tuning and probing (BEiT's 224/256 = 0.875)."""
    return transforms.Compose([
        transforms.Resize(int(img_size / eval_crop),
                          interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(img_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


# Crops of fine-tuning and probing: the paper's (BEiT / timm: random resized crops down to 8 % of
# the area, evaluation at 224/256), and the demo's (on 32 px images 8 % of the area loses the shape).
PAPER_CROPS = dict(crop_scale=0.08, eval_crop=0.875)
DEMO_CROPS = dict(crop_scale=0.35, eval_crop=1.0)
DEMO_TOKENS = os.path.join('runs', 'tokens', 'demo')   # made by tokenizer.py on the first demo run


# ----------------------------------------------------------------------------------------------
# The built-in demo set: 32 px images of 10 shapes, generated from (split, index, seed).

DEMO_CLASSES = ('disc', 'ring', 'square', 'diamond', 'triangle', 'cross', 'stripes',
                'checkerboard', 'two_blobs', 'crescent')
DEMO_SIZES = {'train': 5000, 'val': 1000}
_DEMO_PX = 32
_Y, _X = (np.mgrid[0:_DEMO_PX, 0:_DEMO_PX] + 0.5).astype(np.float32)   # pixel centres
_demo_cache = {}


def _shape_sdf(label, rng, u, v, r):
    """Signed distance (px, < 0 inside) of shape `label` in coordinates (u, v) centred on it."""
    rho = np.hypot(u, v)
    if label == 0:                                  # disc
        return rho - r
    if label == 1:                                  # ring
        return np.abs(rho - 0.8 * r) - rng.uniform(1.2, 2.2)
    if label in (2, 3):                             # square / diamond: the same box, turned 0 / 45 deg
        t = rng.uniform(-0.25, 0.25) + (np.pi / 4 if label == 3 else 0.0)
        a, b = u * np.cos(t) + v * np.sin(t), v * np.cos(t) - u * np.sin(t)
        return np.maximum(np.abs(a), np.abs(b)) - 0.75 * r
    if label == 4:                                  # triangle, any orientation
        t = rng.uniform(0, 2 * np.pi) + np.arange(3)[:, None, None] * 2 * np.pi / 3
        return (u * np.cos(t) + v * np.sin(t)).max(0) - 0.5 * r
    if label == 5:                                  # plus-shaped cross
        w = 0.3 * r
        return np.minimum(np.maximum(np.abs(u) - r, np.abs(v) - w), np.maximum(np.abs(u) - w, np.abs(v) - r))
    if label == 6:                                  # disc filled with stripes at any angle
        t, period = rng.uniform(0, np.pi), rng.uniform(3.0, 5.0)
        stripes = np.sin(2 * np.pi * (u * np.cos(t) + v * np.sin(t)) / period)
        return np.maximum(rho - r, -stripes * period / 4)
    if label == 7:                                  # square filled with a checkerboard
        cell = rng.uniform(2.5, 4.0)
        checks = np.sin(np.pi * u / cell) * np.sin(np.pi * v / cell)
        return np.maximum(np.maximum(np.abs(u), np.abs(v)) - 0.8 * r, -checks * cell)
    t = rng.uniform(0, 2 * np.pi)
    du, dv = np.cos(t), np.sin(t)
    if label == 8:                                  # two blobs side by side
        d = 0.6 * r
        return np.minimum(np.hypot(u - d * du, v - d * dv), np.hypot(u + d * du, v + d * dv)) - 0.5 * r
    # crescent: a disc with a shifted disc cut out
    return np.maximum(rho - r, 0.85 * r - np.hypot(u - 0.5 * r * du, v - 0.5 * r * dv))


def render_demo_image(split, index, seed=0):
    """One demo image: uint8 [32, 32, 3] and its label (index % 10, so classes are balanced).

    Colours, background gradient and texture, noise, position, size and orientation are drawn at
    random, so telling the classes apart needs the shape, not the colour.
    """
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    label = index % len(DEMO_CLASSES)
    bg = rng.uniform(0, 1, 3).astype(np.float32)
    fg = rng.uniform(0, 1, 3).astype(np.float32)
    if np.abs(fg - bg).max() < 0.4:                 # keep the shape visible
        fg = np.where(bg > 0.5, bg - rng.uniform(0.4, 0.5, 3), bg + rng.uniform(0.4, 0.5, 3))
    # background: a colour gradient plus a faint oriented wave
    g, w = rng.normal(size=2), rng.uniform(-1, 1, 2)
    ramp = (g[0] * (_X - 16) + g[1] * (_Y - 16)) / 32
    wave = np.sin(w[0] * _X + w[1] * _Y + rng.uniform(0, 2 * np.pi))
    img = bg + ramp[..., None] * rng.uniform(-0.3, 0.3, 3) + wave[..., None] * rng.uniform(0, 0.08, 3)
    r = rng.uniform(6.0, 10.0)
    cx, cy = rng.uniform(r * 0.8 + 1, _DEMO_PX - r * 0.8 - 1, 2)
    sdf = _shape_sdf(label, rng, _X - cx, _Y - cy, r)
    alpha = np.clip(0.5 - sdf, 0, 1)[..., None]     # 1 px anti-aliased edge
    noise = rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(0, 0.06)
    img = img * (1 - alpha) + fg * alpha + noise
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), label


class DemoDataset(Dataset):
    """The built-in labelled set: 5,000 train / 1,000 val 32 px RGB images of 10 shape classes.

    Image i of a split is a pure function of (split, i, seed) (~15k images/s on one core), made
    once per process per (split, seed) and kept in memory (15 MB); DataLoader workers share it.
    """

    classes = list(DEMO_CLASSES)

    def __init__(self, split, seed=0, transform=None):
        if split not in SPLITS:
            raise ValueError(f'unknown split {split!r} for demo: use one of {SPLITS}')
        self.split, self.seed, self.transform = split, seed, transform
        if (split, seed) not in _demo_cache:
            images, labels = zip(*(render_demo_image(split, i, seed) for i in range(DEMO_SIZES[split])))
            _demo_cache[split, seed] = np.stack(images), np.array(labels)
        self.images, self.labels = _demo_cache[split, seed]  # [N, 32, 32, 3] uint8, [N]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), int(self.labels[i])


# ----------------------------------------------------------------------------------------------
# Image folders (ImageNet layout) with unreadable files skipped.

_warned_paths = set()


class ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder, except that an unreadable file gives None instead of raising.

    Raising inside a DataLoader worker kills a long run for one bad JPEG; None is dropped by
    collate_skip, warned about once per path, and listed in `self.skipped` (indices, this process).
    """

    def __init__(self, root, transform=None):
        super().__init__(root, transform=transform)
        self.skipped = set()

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            img = self.loader(path)                 # PIL open + convert('RGB'): decodes fully
        except (OSError, SyntaxError) as e:         # truncated / not an image / broken PNG
            self.skipped.add(i)
            if path not in _warned_paths:
                _warned_paths.add(path)
                warnings.warn(f'skipping unreadable image {path} ({type(e).__name__}: {e})')
            return None
        return (self.transform(img) if self.transform else img), label


# ----------------------------------------------------------------------------------------------
# torchvision datasets: name -> (constructor, its arguments for our train / val split, folder).

TORCHVISION_DATASETS = {
    'cifar10': (datasets.CIFAR10, {'train': dict(train=True), 'val': dict(train=False)}, 'cifar-10-batches-py'),
    'cifar100': (datasets.CIFAR100, {'train': dict(train=True), 'val': dict(train=False)}, 'cifar-100-python'),
    'stl10': (datasets.STL10, {'train': dict(split='train'), 'val': dict(split='test')}, 'stl10_binary'),
    'food101': (datasets.Food101, {'train': dict(split='train'), 'val': dict(split='test')}, 'food-101'),
    # torchvision can no longer download Stanford Cars (the original URL is gone)
    'stanford_cars': (datasets.StanfordCars, {'train': dict(split='train'), 'val': dict(split='test')},
                      'stanford_cars'),
    'fgvc_aircraft': (datasets.FGVCAircraft, {'train': dict(split='trainval'), 'val': dict(split='test')},
                      'fgvc-aircraft-2013b'),
}


def build_dataset(name, split, root='data', transform=None):
    """The (image, label) dataset `name`, split 'train' or 'val'; see the module docstring."""
    if split not in SPLITS:
        raise ValueError(f'unknown split {split!r}: use one of {SPLITS}')
    if name == 'demo':
        return DemoDataset(split, transform=transform)
    if name in TORCHVISION_DATASETS:
        ctor, split_args, folder = TORCHVISION_DATASETS[name]
        download = name != 'stanford_cars'
        try:
            return ctor(root, **split_args[split], transform=transform, download=download)
        except Exception as e:  # offline, a dead URL, a half-downloaded archive: say how to fix it
            cause = (str(e).strip().splitlines() or [''])[0]
            how = ('download it by hand (e.g. from Kaggle) and unpack it' if not download else
                   f'on a machine with internet run `python -c "import torchvision; '
                   f'torchvision.datasets.{ctor.__name__}(\'data\', download=True)"` and copy the result')
            raise ValueError(f'cannot load {name} from {os.path.join(root, folder)} '
                             f'({type(e).__name__}: {cause}): {how} so that {os.path.join(root, folder)} '
                             f'exists, or point --data-root at its parent') from None
    if os.path.isdir(name):
        folder = os.path.join(name, split)
        if not os.path.isdir(folder):
            raise ValueError(f'{name} has no {split}/ folder: expected the ImageFolder layout '
                             f'{name}/{{train,val}}/<class>/<image>')
        try:
            return ImageFolder(folder, transform=transform)
        except FileNotFoundError as e:
            raise ValueError(f'{folder}: {e}') from None
    raise ValueError(f'unknown dataset {name!r}: use demo, an ImageFolder directory (with train/ and '
                     f'val/ inside), or one of {", ".join(TORCHVISION_DATASETS)}')


def num_classes(dataset):
    return len(dataset.classes)


def dataset_id(name):
    """How meta.json names a dataset: the name itself, or the real absolute path of a folder."""
    return name if name == 'demo' or name in TORCHVISION_DATASETS else os.path.realpath(name)


# ----------------------------------------------------------------------------------------------
# Seeded sampling: the loader is asked for (epoch, index) keys, so every random draw a sample
# meets can be a function of (seed, epoch, index): the same on any number of processes.


def seed_for(*keys):
    """A 64-bit seed that is a pure function of the integer keys."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0])


class EpochSampler(DistributedSampler):
    """DistributedSampler (shuffled by (seed, epoch); rank r takes every world-th index) yielding
    (epoch, index) keys, only `per_epoch` of them (whole steps), after skipping `skip` (resume)."""

    def __init__(self, dataset, world_size, rank, seed, per_epoch):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.per_epoch, self.skip = per_epoch, 0

    def __iter__(self):
        return ((self.epoch, i) for i in itertools.islice(super().__iter__(), self.skip, self.per_epoch))

    def __len__(self):
        return self.per_epoch - self.skip


class SeededSet(Dataset):
    """dataset[index] for the key (epoch, index) of EpochSampler, its random transform (the colour
    jitter here; finetune.py's crops and RandAugment) drawn from seed_for(seed, epoch, index, 0): the
    same in any worker, on any rank, after a resume."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        with torch.random.fork_rng(devices=[]):  # the process's own stream is left untouched
            torch.random.default_generator.manual_seed(seed_for(self.seed, epoch, i, 0))
            return self.dataset[i]


# ----------------------------------------------------------------------------------------------
# Wrappers and the collate function every DataLoader uses.


def collate_skip(batch):
    """default_collate without the unreadable samples (None); None if none is left."""
    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None


class IndexedDataset(Dataset):
    """(index, image, label): lets a consumer know which rows survived collate_skip."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return None if item is None else (i, *item)


class TokenizedDataset(Dataset):
    """(image, tokens) with tokens the int64 [G*G] raster-order row `i` of the token file.

    `skipped` (meta['skipped']) lists images the tokenizer could not read: their rows hold no
    tokens, so they are dropped here even if the file has become readable since.
    """

    def __init__(self, dataset, tokens, skipped=()):
        if len(dataset) != len(tokens):
            raise ValueError(f'the token file has {len(tokens)} rows but the dataset has {len(dataset)} '
                             f'images: re-run tokenizer.py for this dataset and split')
        self.dataset, self.tokens, self.skipped = dataset, tokens, set(skipped)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = None if i in self.skipped else self.dataset[i]
        if item is None:
            return None
        return item[0], torch.from_numpy(self.tokens[i].astype(np.int64).reshape(-1))  # [G*G]


# ----------------------------------------------------------------------------------------------
# Token files: <dir>/tokens.npy (uint16 [num_images, G, G]), codebook.npy (float32 [K, C]), meta.json.


def write_tokens(out_dir, tokens, codebook, meta):
    """Write the three files, each to a temporary name first so a kill never leaves a torn file."""
    os.makedirs(out_dir, exist_ok=True)
    for name, write in (('tokens.npy', lambda f: np.save(f, tokens.astype(np.uint16))),
                        ('codebook.npy', lambda f: np.save(f, codebook.astype(np.float32))),
                        ('meta.json', lambda f: f.write(json.dumps(meta, indent=1).encode()))):
        path = os.path.join(out_dir, name)
        with open(path + '.tmp', 'wb') as f:
            write(f)
        os.replace(path + '.tmp', path)


def load_tokens(token_dir, dataset_name, split, num_images, grid, vocab_size=None):
    """The memory-mapped uint16 [num_images, G, G] tokens and meta.json, checked against this run."""
    fix = (f'run `python tokenizer.py --data {dataset_name} --split {split} --out {token_dir}`'
           + ('' if split == 'train' else ' --codebook <the train split\'s token dir>'))
    paths = [os.path.join(token_dir, f) for f in ('tokens.npy', 'meta.json')]
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f'no token file {path}: {fix}')
    tokens = np.load(paths[0], mmap_mode='r')
    with open(paths[1]) as f:
        meta = json.load(f)
    checks = [('dataset', meta.get('dataset'), dataset_id(dataset_name)), ('split', meta.get('split'), split),
              ('image count', meta.get('num_images'), num_images), ('grid', meta.get('grid'), grid)]
    if vocab_size is not None:
        checks.append(('vocabulary', meta.get('vocab_size'), vocab_size))
    for what, theirs, ours in checks:
        if theirs != ours:
            raise ValueError(f'tokens in {token_dir} were made for {what} {theirs!r}, this run uses {ours!r}: '
                             f'{fix} (or pass the token dir made for this run)')
    if tokens.dtype != np.uint16 or tokens.shape != (num_images, grid, grid):
        raise ValueError(f'{paths[0]} holds {tokens.dtype} {tokens.shape}, meta.json says uint16 '
                         f'{(num_images, grid, grid)}: the file is damaged, {fix}')
    return tokens, meta
