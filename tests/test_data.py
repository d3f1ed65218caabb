"""data.py: the demo set's determinism and structure, the shared geometry against PIL, unreadable
images skipped (not crashed on), torchvision sets failing with a clear message, token files refused
when they belong to another run."""

import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

import data


# ---------------------------------------------------------------------------------------------
# demo


def test_demo_is_a_pure_function_of_split_index_seed():
    val = data.DemoDataset('val')
    assert len(val) == 1000 and len(data.DemoDataset('train')) == data.DEMO_SIZES['train']
    for i in (0, 7, 999):
        img, label = data.render_demo_image('val', i, seed=0)
        assert np.array_equal(np.asarray(val[i][0]), img) and val[i][1] == label == i % 10
    assert val[3][0].mode == 'RGB' and val[3][0].size == (32, 32)
    assert not np.array_equal(
        data.render_demo_image('val', 5, seed=1)[0], val.images[5]
    )  # seed matters
    assert not np.array_equal(data.render_demo_image('train', 5)[0], val.images[5])  # split matters
    assert len({val.images[i].tobytes() for i in range(len(val))}) == len(val)  # no repeats
    assert np.array_equal(np.bincount(val.labels), [100] * 10) and val.classes == list(
        data.DEMO_CLASSES
    )
    assert len(val.classes) == 10


@pytest.mark.slow
def test_demo_classes_are_shapes_not_colours():
    """LDA on each image's mean colour is at chance (10%); on the low-frequency
    amplitude spectrum of the grey image (blind to colour and position) it is far above."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    train, val = data.DemoDataset('train'), data.DemoDataset('val')

    def spectrum(ds, f=8):
        grey = ds.images.astype(np.float32).mean(-1)
        amp = np.abs(np.fft.rfft2(grey - grey.mean((1, 2), keepdims=True)))
        amp = np.concatenate([amp[:, :f, :f], amp[:, -f:, :f]], 1).reshape(len(ds), -1)
        return np.log(amp / amp.sum(1, keepdims=True) + 1e-4)

    def colour(ds):
        return ds.images.reshape(len(ds), -1, 3).mean(1)

    def score(feat):
        lda = LinearDiscriminantAnalysis().fit(feat(train), train.labels)
        return lda.score(feat(val), val.labels)

    assert score(colour) < 0.2
    assert score(spectrum) > 0.5


def test_demo_transform_is_applied():
    ds = data.DemoDataset('val', transform=transforms.ToTensor())
    x, y = ds[4]
    assert x.shape == (3, 32, 32) and torch.equal(
        x, transforms.ToTensor()(Image.fromarray(ds.images[4]))
    )


# ---------------------------------------------------------------------------------------------
# the shared pre-training geometry


def test_pretrain_geometry_against_pil():
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))  # h 64, w 96
    out = data.pretrain_geometry(32)(wide)
    # independent reference: short side 64 -> 32 (so 96 -> 48), keep the centre 32 columns
    ref = wide.resize((48, 32), Image.BICUBIC).crop((8, 0, 40, 32))
    assert out.size == (32, 32) and np.array_equal(np.asarray(out), np.asarray(ref))
    tall = Image.fromarray(rng.integers(0, 256, (100, 50, 3), dtype=np.uint8))
    assert np.array_equal(
        np.asarray(data.pretrain_geometry(25)(tall)),
        np.asarray(tall.resize((25, 50), Image.BICUBIC).crop((0, 12, 25, 37))),
    )
    demo = data.DemoDataset('val')[0][0]
    assert np.array_equal(
        np.asarray(data.pretrain_geometry(32)(demo)), np.asarray(demo)
    )  # identity at 32


# ---------------------------------------------------------------------------------------------
# image folders, unreadable files


def make_folder(root, split='train', n=4, broken=()):
    """n JPEGs in two classes; names in `broken` are written as damaged files."""
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n):
        os.makedirs(os.path.join(root, split, 'ab'[i % 2]), exist_ok=True)
        path = os.path.join(root, split, 'ab'[i % 2], f'{i}.jpg')
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path, quality=95)
        paths.append(path)
    for name in broken:
        path = os.path.join(root, split, 'a', name)
        if name.startswith('truncated'):
            good = open(paths[0], 'rb').read()
            open(path, 'wb').write(good[: len(good) // 2])
        else:
            open(path, 'wb').write(b'this is not an image')
    return paths


def test_image_folder_skips_unreadable_files_and_warns_once(tmp_path):
    make_folder(tmp_path, n=4, broken=('truncated.jpg', 'text.jpg'))
    ds = data.build_dataset(str(tmp_path), 'train', transform=transforms.ToTensor())
    assert len(ds) == 6 and ds.classes == ['a', 'b'] and len(ds.classes) == 2
    bad = {i for i, (p, _) in enumerate(ds.samples) if 'truncated' in p or 'text' in p}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        items = [ds[i] for i in range(len(ds))] + [ds[i] for i in range(len(ds))]  # two epochs
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2  # once per bad file
    for i in bad:
        assert items[i] is None and any(ds.samples[i][0] in m for m in messages)
    assert ds.skipped == bad
    # through a worker process and collate_skip: the readable images, with their own indices
    loader = DataLoader(
        data.IndexedDataset(ds), batch_size=6, num_workers=1, collate_fn=data.collate_skip
    )
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ((index, images, labels),) = list(loader)
    assert set(index.tolist()) == set(range(6)) - bad and images.shape == (4, 3, 40, 48)
    assert data.collate_skip([None, None]) is None


def test_build_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match='unknown dataset .*nowhere.*demo.*cifar10.*fgvc_aircraft'):
        data.build_dataset('nowhere', 'train')
    with pytest.raises(ValueError, match="unknown split 'test'"):
        data.build_dataset('demo', 'test')
    make_folder(tmp_path, 'train')
    with pytest.raises(ValueError, match='has no val/ folder'):
        data.build_dataset(str(tmp_path), 'val')
    os.makedirs(tmp_path / 'empty' / 'val' / 'cls')
    with pytest.raises(ValueError, match='empty'):
        data.build_dataset(str(tmp_path / 'empty'), 'val')


def test_torchvision_offline_gives_one_clear_message(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        import urllib.error

        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')

    ctor, splits, folder = data.TORCHVISION_DATASETS['cifar10']
    monkeypatch.setitem(data.TORCHVISION_DATASETS, 'cifar10', (offline, splits, folder))
    root = str(tmp_path / 'd')
    with pytest.raises(ValueError) as e:
        data.build_dataset('cifar10', 'val', root=root)
    msg = str(e.value)
    assert (
        '\n' not in msg and 'URLError' in msg and os.path.join(root, 'cifar-10-batches-py') in msg
    )
    assert 'download=True' in msg and '--data-root' in msg
    # Stanford Cars cannot be downloaded at all: the real torchvision class, offline by design
    with pytest.raises(
        ValueError, match=re.escape(os.path.join(root, 'stanford_cars')) + '.*by hand'
    ):
        data.build_dataset('stanford_cars', 'train', root=root)


# ---------------------------------------------------------------------------------------------
# token files


def write_run(tmp_path, n=6, G=3, K=10):
    tokens = np.random.default_rng(0).integers(0, K, (n, G, G)).astype(np.uint16)
    meta = dict(dataset='demo', split='train', num_images=n, grid=G, vocab_size=K, skipped=[])
    data.write_tokens(str(tmp_path), tokens, np.zeros((K, 4), np.float32), meta)
    return tokens


def test_tokens_round_trip_memory_mapped(tmp_path):
    tokens = write_run(tmp_path)
    got, meta = data.load_tokens(str(tmp_path), 'demo', 'train', 6, 3, vocab_size=10)
    assert isinstance(got, np.memmap) and got.dtype == np.uint16 and np.array_equal(got, tokens)
    assert meta['vocab_size'] == 10 and np.load(tmp_path / 'codebook.npy').dtype == np.float32
    assert sorted(os.listdir(tmp_path)) == [
        'codebook.npy',
        'meta.json',
        'tokens.npy',
    ]  # no .tmp left


@pytest.mark.parametrize(
    'args, theirs, ours',
    [
        (('cifar10', 'train', 6, 3, 10), "'demo'", "'cifar10'"),
        (('demo', 'val', 6, 3, 10), "'train'", "'val'"),
        (('demo', 'train', 7, 3, 10), '6', '7'),
        (('demo', 'train', 6, 4, 10), '3', '4'),
        (('demo', 'train', 6, 3, 8192), '10', '8192'),
    ],
)
def test_mismatched_token_file_is_refused_naming_both_values(tmp_path, args, theirs, ours):
    write_run(tmp_path)
    with pytest.raises(ValueError) as e:
        data.load_tokens(str(tmp_path), *args[:4], vocab_size=args[4])
    msg = str(e.value)
    assert (
        'made for' in msg
        and theirs in msg
        and f'this run uses {ours}' in msg
        and 'tokenizer.py' in msg
    )


def test_missing_or_damaged_token_file(tmp_path):
    with pytest.raises(
        ValueError,
        match=r'no token file .*tokens\.npy.*python tokenizer\.py --data demo '
        r'--split val .*--codebook',
    ):
        data.load_tokens(str(tmp_path / 'none'), 'demo', 'val', 6, 3)
    write_run(tmp_path)
    np.save(tmp_path / 'tokens.npy', np.zeros((6, 3, 3), np.int32))  # not uint16
    with pytest.raises(ValueError, match='damaged'):
        data.load_tokens(str(tmp_path), 'demo', 'train', 6, 3)


def test_folder_dataset_id_is_its_real_path(tmp_path):
    write_run(tmp_path / 'tok')
    meta = json.loads((tmp_path / 'tok' / 'meta.json').read_text())
    meta['dataset'] = data.dataset_id(str(tmp_path / 'imgs'))
    (tmp_path / 'tok' / 'meta.json').write_text(json.dumps(meta))
    data.load_tokens(
        str(tmp_path / 'tok'), str(tmp_path / 'x' / '..' / 'imgs') + '/', 'train', 6, 3
    )
    with pytest.raises(ValueError, match='made for dataset'):
        data.load_tokens(str(tmp_path / 'tok'), str(tmp_path / 'other'), 'train', 6, 3)


def test_tokenized_dataset_rows_aligned_by_index(tmp_path):
    tokens = write_run(tmp_path)
    ds = data.DemoDataset('val', transform=transforms.ToTensor())
    sub = torch.utils.data.Subset(ds, range(6))
    pairs = data.TokenizedDataset(sub, np.load(tmp_path / 'tokens.npy', mmap_mode='r'), skipped=[2])
    image, tok = pairs[4]
    assert torch.equal(image, ds[4][0]) and tok.dtype == torch.int64 and tok.shape == (9,)
    assert tok.tolist() == tokens[4].reshape(-1).tolist()  # raster order
    assert pairs[2] is None  # tokenizer skipped it
    images, toks = data.collate_skip([pairs[i] for i in range(4)])
    assert images.shape == (3, 3, 32, 32) and toks[2].tolist() == tokens[3].reshape(-1).tolist()
    with pytest.raises(ValueError, match='6 rows but the dataset has 1000'):
        data.TokenizedDataset(ds, tokens)
