"""The paper-scale input pipeline: the decoded-image cache (data.py), the colour jitter on the
device against torchvision's ColorJitter, the cached path through pretrain.py, --data synthetic."""

import json
import math
import os

import numpy as np
import pytest
import torch
from torchvision import transforms

import data
import pretrain

SIZE = 32  # the micro ViT's input
FAST = ['--model', 'micro', '--dtype', 'float32', '--workers', '0', '--log-every', '1',
        '--batch-size', '8']


@pytest.fixture(scope='module')
def cached(make_demo_folder, tmp_path_factory):
    """(root, tokens, cache dir) for a 16-image folder with one unreadable file."""
    root, tokens = make_demo_folder(train=16)
    cache = str(tmp_path_factory.mktemp('cache'))
    data.main(['--data', root, '--split', 'train', '--size', str(SIZE), '--out', cache,
               '--workers', '0'])
    return root, tokens, cache


def test_the_cache_holds_the_pretraining_crops(cached):
    root, _, cache = cached
    images = np.load(os.path.join(cache, 'images.npy'))
    folder = data.build_dataset(root, 'train', transform=data.pretrain_geometry(SIZE))
    assert images.shape == (16, SIZE, SIZE, 3) and images.dtype == np.uint8
    for i in (0, 7, 15):
        np.testing.assert_array_equal(images[i], np.asarray(folder[i][0]))
    meta = json.load(open(os.path.join(cache, 'images.json')))
    assert (meta['split'], meta['size'], meta['num_images'], meta['skipped']) == (
        'train', SIZE, 16, [])


def test_unreadable_images_are_listed_and_skipped(make_demo_folder, tmp_path):
    root, _ = make_demo_folder(train=4)
    broken = os.path.join(root, 'train', data.DEMO_CLASSES[0], 'broken.png')
    with open(broken, 'wb') as f:
        f.write(b'not a png')
    with pytest.warns(UserWarning, match='broken.png'):
        data.write_image_cache(root, 'train', SIZE, str(tmp_path))
    meta = json.load(open(tmp_path / 'images.json'))
    dataset = data.build_dataset(root, 'train')
    index = [p for p, _ in dataset.samples].index(broken)
    assert meta['skipped'] == [index]
    assert data.CachedImages(str(tmp_path), root, 'train', SIZE, dataset)[index] is None


def test_a_cache_of_other_images_or_size_is_refused(cached, make_demo_folder):
    root, _, cache = cached
    other, _ = make_demo_folder(train=16)  # same count, other paths
    for name, size, what in ((other, SIZE, 'dataset'), (root, 64, 'size')):
        dataset = data.build_dataset(name, 'train')
        with pytest.raises(ValueError, match=f'made for {what} .*run `python data.py --data '
                           f'{name} --split train --size {size} --out {cache}`'):
            data.CachedImages(cache, name, 'train', size, dataset)
    data.write_image_cache(other, 'train', SIZE, os.path.join(other, 'cache'))
    os.rename(os.path.join(other, 'train', 'ring'), os.path.join(other, 'train', 'ring2'))
    with pytest.raises(ValueError, match='made for files '):  # same folder, count and size
        data.CachedImages(os.path.join(other, 'cache'), other, 'train', SIZE,
                          data.build_dataset(other, 'train'))
    with pytest.raises(ValueError, match='no readable image cache in /nowhere'):
        data.CachedImages('/nowhere', root, 'train', SIZE, data.build_dataset(root, 'train'))


def torchvision_jitter(images, seed):
    """torchvision's ColorJitter(0.4, 0.4, 0.4) on each float image, drawn under the key that
    pretrain.py gives the sample's jitter, then normalised."""
    jitter = transforms.Compose([transforms.ColorJitter(0.4, 0.4, 0.4),
                                 transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])
    rows = []
    for i, image in enumerate(images):
        with data.keyed(seed, 0, i, 0):
            rows.append(jitter(image.permute(2, 0, 1).float() / 255))
    return torch.stack(rows)


def device_jitter(images, seed):
    epochs, index = torch.zeros(len(images), dtype=torch.long), torch.arange(len(images))
    params = data.per_sample(lambda n: data.draw_jitter(n, 0.4), epochs, index, seed, 0)
    return data.color_jitter(images, params), params


def test_device_jitter_is_torchvisions_colorjitter_where_nothing_clips():
    """Same draws (factors and random order, per sample) and, for mid-grey images that no op
    pushes out of [0, 1], the same pixels: the one-matrix composition is exact."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(100, 140, (24, 8, 8, 3), dtype=torch.uint8, generator=g)
    ours, params = device_jitter(images, seed=3)
    torch.testing.assert_close(ours, torchvision_jitter(images, seed=3), rtol=0, atol=1e-5)
    orders = {tuple(p[:4].long().tolist()) for p in params}
    assert len(orders) > 10 and params[:, 4:].min() >= 0.6 and params[:, 4:].max() <= 1.4
    # Full-range images: torchvision clamps after each op, we once, at the end.
    images = torch.randint(0, 256, (24, 8, 8, 3), dtype=torch.uint8, generator=g)
    full = device_jitter(images, 3)[0]
    lo = (-torch.tensor(data.IMAGENET_MEAN) / torch.tensor(data.IMAGENET_STD))[:, None, None]
    hi = lo + 1 / torch.tensor(data.IMAGENET_STD)[:, None, None]
    assert (full >= lo - 1e-6).all() and (full <= hi + 1e-6).all()
    assert ((full - lo).abs() < 1e-6).any() and ((full - hi).abs() < 1e-6).any()


def test_without_jitter_the_cached_run_is_the_pil_run(cached, tmp_path):
    """--color-jitter 0: the cache's crops, normalised on the device, are ToTensor + Normalize
    of the PIL path's crops, so the two runs have the same losses."""
    root, tokens, cache = cached
    common = ['--data', root, '--tokens', tokens, '--steps', '3', '--color-jitter', '0', *FAST]
    pretrain.main([*common, '--out', str(tmp_path / 'pil')])
    pretrain.main([*common, '--out', str(tmp_path / 'cache'), '--image-cache', cache])
    losses = [[json.loads(line)['loss'] for line in open(tmp_path / run / 'log.jsonl')]
              for run in ('pil', 'cache')]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def test_the_cache_beside_the_tokens_is_found_and_a_bad_one_refused(cached, tmp_path, capsys):
    root, tokens, cache = cached
    beside = tmp_path / 'tokens'
    os.makedirs(beside)
    for d, names in ((tokens, ('tokens.npy', 'codebook.npy', 'meta.json')),
                     (cache, ('images.npy', 'images.json'))):
        for name in names:
            os.symlink(os.path.join(d, name), beside / name)
    pretrain.main(['--data', root, '--tokens', str(beside), '--out', str(tmp_path / 'run'),
                   '--steps', '1', *FAST])
    assert f'images from the decoded-image cache {beside}' in capsys.readouterr().out
    data.write_image_cache(root, 'train', 64, str(tmp_path / 'big'))
    with pytest.raises(SystemExit, match='made for size 64, this run has 32: run `python data.py'):
        pretrain.main(['--data', root, '--tokens', tokens, '--image-cache', str(tmp_path / 'big'),
                       '--out', str(tmp_path / 'run2'), '--steps', '1', *FAST])


def test_synthetic_data_runs_the_whole_loop(tmp_path):
    summary = pretrain.main(['--data', 'synthetic', '--out', str(tmp_path), '--steps', '2',
                             '--epochs', '1', *FAST])
    assert summary['step'] == 2 and abs(summary['loss'] - math.log(8192)) < 1.0
