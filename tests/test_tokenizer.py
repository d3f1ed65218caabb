"""tokenizer.py: k-means against scikit-learn and brute force, empty clusters, 1 vs 2 processes
(torchrun, gloo), the command end to end on the demo (pixels) and on an ImageFolder with a random
CLIP ResNet (tokens recomputed with OpenAI's reference code), the shared geometry, bad input."""
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from torchvision import transforms

import data
import tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the demo command on the ViT's raw 4 px patches (its default is hog at grid 4), made quick
DEMO = ['--features', 'pixels', '--grid', '8', '--patch', '4', '--vocab', '64', '--iters', '3']


def blobs(n=2000, k=12, std=1.5, seed=0):
    x, _ = make_blobs(n_samples=n, centers=k, n_features=6, cluster_std=std, random_state=seed)
    return x


def nearest(x, c):
    """Brute-force squared distances in float64 [n, K]."""
    x, c = np.asarray(x, np.float64), np.asarray(c, np.float64)
    return ((x[:, None, :] - c[None]) ** 2).sum(-1)


def assert_nearest(tokens, x, c, tol=1e-4):
    """Each token is a nearest centroid (ties within float error may go either way)."""
    d = nearest(x, c)
    picked = d[np.arange(len(d)), np.asarray(tokens).reshape(-1)]
    assert np.all(picked <= d.min(1) + tol * (1 + d.min(1)))


# k-means


def test_kmeans_inertia_matches_sklearn():
    x = blobs()
    sk = KMeans(12, n_init=4, random_state=0).fit(x)
    xt = torch.tensor(x, dtype=torch.float32)
    runs = [tokenizer.kmeans(xt, 12, iters=30, seed=s) for s in range(4)]
    ours = [nearest(x, c).min(1).sum() for c, _ in runs]  # recomputed, not the reported value
    assert min(ours) <= 1.01 * sk.inertia_  # best of 4 k-means++ starts, as sklearn
    for (c, inertia), true in zip(runs, ours):
        assert inertia[-1] == pytest.approx(true, rel=1e-4) and len(inertia) == 31
        assert all(b <= a * (1 + 1e-6) for a, b in zip(inertia, inertia[1:]))  # never goes up


def test_lloyd_steps_match_sklearn_from_the_same_init():
    x = blobs(std=3.0)  # overlapping: points move for a while
    init = x[np.random.default_rng(0).choice(len(x), 12, replace=False)]
    sk = KMeans(12, init=init, n_init=1, max_iter=6, algorithm='lloyd', tol=0).fit(x)
    c, _ = tokenizer.kmeans(torch.tensor(x, dtype=torch.float32), 12, iters=6,
                            init=torch.tensor(init))
    assert np.allclose(c.numpy(), sk.cluster_centers_, atol=1e-4)


def test_assign_is_nearest_centroid_in_chunks():
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(3000, 16, generator=g) * 3, torch.randn(300, 16, generator=g) * 3
    index, d2 = tokenizer.assign(x.half(), c, chunk=777)  # float16 storage, float32 maths
    d = nearest(x.half().float(), c)
    assert_nearest(index.numpy(), x.half().float(), c)
    assert np.allclose(d2.numpy(), d.min(1), rtol=1e-4, atol=1e-3)


def test_empty_cluster_is_reseeded():
    x = blobs(k=5, std=0.5)
    lost = np.full((1, 6), 1e3)  # a centroid no point is near
    init = torch.tensor(np.concatenate([x[:4], lost]), dtype=torch.float32)
    c, _ = tokenizer.kmeans(torch.tensor(x, dtype=torch.float32), 5, iters=8, init=init)
    counts = np.bincount(nearest(x, c).argmin(1), minlength=5)
    assert counts.min() > 0 and np.abs(c.numpy()).max() < 100
    with pytest.raises(ValueError, match='cannot fit 10 centroids to 9 points'):
        tokenizer.kmeans(torch.randn(9, 2), 10)


# features


def test_pixel_feature_is_the_vit_patch():
    """Feature (i, j) = the 3 x p x p block the ViT's patch embedding (stride-p conv) sees there."""
    images = torch.randn(2, 3, 32, 32)
    f = tokenizer.pixel_features(images, 4)  # [B, G, G, 3*4*4]
    assert f.shape == (2, 8, 8, 48)
    assert torch.equal(f[1, 2, 5], images[1, :, 8:12, 20:24].reshape(-1))
    conv = torch.nn.Conv2d(3, 7, 4, stride=4)
    embedded = conv(images).permute(0, 2, 3, 1)  # [B, G, G, D]
    assert torch.allclose(embedded, f @ conv.weight.reshape(7, -1).T + conv.bias, atol=1e-5)


def hog_reference(image, patch, bins=9, floor=0.015):
    """HOG written out pixel by pixel in float64: image [3, S, S] in [0, 1] -> [G, G, bins]."""
    grey = np.asarray(image, np.float64).mean(0)
    S, G = grey.shape[0], grey.shape[0] // patch

    def at(y, x):  # the replicated border
        return grey[min(max(y, 0), S - 1), min(max(x, 0), S - 1)]

    votes = np.zeros((S, S, bins))
    for y in range(S):
        for x in range(S):
            gx, gy = (at(y, x + 1) - at(y, x - 1)) / 2, (at(y + 1, x) - at(y - 1, x)) / 2
            angle = np.arctan2(gy, gx) % np.pi  # unsigned: an edge's two polarities alike
            b = angle / (np.pi / bins) - 0.5  # bin k is centred at (k + 0.5) * pi / bins
            k = int(np.floor(b))
            votes[y, x, k % bins] += np.hypot(gx, gy) * (1 - (b - k))
            votes[y, x, (k + 1) % bins] += np.hypot(gx, gy) * (b - k)
    out = np.zeros((G, G, bins))
    for i in range(G):
        for j in range(G):
            rows = slice(max(i * patch - patch // 2, 0), i * patch + patch + patch // 2)
            cols = slice(max(j * patch - patch // 2, 0), j * patch + patch + patch // 2)
            h = votes[rows, cols].sum((0, 1)) / (2 * patch) ** 2  # zero padding counts
            out[i, j] = h / (np.linalg.norm(h) + floor)
    return out


def test_hog_feature_matches_a_pixel_by_pixel_reference():
    images = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    images[1, :, 4:12, 4:12] += 0.7  # a square: edges of two orientations
    f = tokenizer.hog_features(images, 4)  # [B, G, G, 9]
    assert f.shape == (2, 4, 4, 9)
    for b in range(2):
        np.testing.assert_allclose(f[b].numpy(), hog_reference(images[b], 4), atol=1e-9)


def test_hog_feature_ignores_colour():
    """The demo draws colours at random: the feature must see the edges only."""
    img = data.DemoDataset('train').images[:8]  # [n, 32, 32, 3] uint8
    images = torch.from_numpy(img).permute(0, 3, 1, 2).double() / 255
    f = tokenizer.hog_features(images, 4)
    inverted = tokenizer.hog_features(1 - images, 4)  # dark on light <-> light on dark
    swapped = tokenizer.hog_features(images[:, [2, 0, 1]], 4)
    for other in (inverted, swapped):
        assert torch.allclose(f, other, atol=1e-6)
    assert tokenizer.hog_features(torch.full((1, 3, 32, 32), 0.3), 4).abs().max() == 0  # flat
    assert not torch.allclose(f, tokenizer.hog_features(images.transpose(2, 3), 4), atol=0.1)


# the command on the demo (pixels)


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp('demo')
    train = tokenizer.main(['--data', 'demo', '--split', 'train', '--out', str(root / 'train'),
                            *DEMO])
    val = tokenizer.main(['--data', 'demo', '--split', 'val', '--codebook', str(root / 'train'),
                          '--out', str(root / 'val')])
    return root, train, val


def demo_features(split, index):
    """The pixel features recomputed from the demo's uint8 images with numpy: [n, G*G, 48]."""
    img = data.DemoDataset(split).images[index] / 255.0
    img = (img - data.IMAGENET_MEAN) / data.IMAGENET_STD  # [n, 32, 32, 3]
    patches = img.reshape(-1, 8, 4, 8, 4, 3).transpose(0, 1, 3, 5, 2, 4)  # [n, G, G, 3, p, p]
    return patches.reshape(len(img), 64, 48)


@pytest.mark.slow
def test_demo_pixels_end_to_end(demo_run):
    root, train, val = demo_run
    n = data.DEMO_SIZES['train']
    tokens, meta = data.load_tokens(str(root / 'train'), 'demo', 'train', n, 8, vocab_size=64)
    codebook = np.load(root / 'train' / 'codebook.npy')
    assert tokens.dtype == np.uint16 and tokens.shape == (n, 8, 8) and tokens.max() < 64
    assert codebook.dtype == np.float32 and codebook.shape == (64, 48)
    assert meta == train and meta['features'] == 'pixels' and meta['image_size'] == 32
    assert meta['skipped'] == []
    assert abs(meta['features_fitted'] - 0.1 * n * 64) < 0.03 * 0.1 * n * 64  # --sample 0.1
    assert len(meta['inertia']) == 4 and 1 < meta['perplexity'] <= meta['tokens_used'] <= 64
    some = np.arange(0, n, 10)
    assert_nearest(tokens[some], demo_features('train', some).reshape(-1, 48), codebook)
    # the val split, tokenized with the train codebook
    vtokens, vmeta = data.load_tokens(str(root / 'val'), 'demo', 'val', 1000, 8, vocab_size=64)
    assert np.array_equal(np.load(root / 'val' / 'codebook.npy'), codebook)
    assert vmeta['codebook_from'] == os.path.realpath(root / 'train') and vmeta['iters'] == 3
    assert vmeta['inertia'] == meta['inertia'] and vmeta['sample'] == 0.1
    assert_nearest(vtokens, demo_features('val', np.arange(1000)).reshape(-1, 48), codebook)


@pytest.mark.slow
def test_tokenizer_cuts_images_with_the_shared_geometry(demo_run, tmp_path, monkeypatch, capsys):
    """Swap data.pretrain_geometry for one that also shifts the image right by one patch: the
    tokenizer must call it (at patch*G px) and its token grid must shift with it."""
    root, _, _ = demo_run
    calls, shared = [], data.pretrain_geometry

    def shifted(size):
        calls.append(size)
        roll = transforms.Lambda(lambda im: Image.fromarray(np.roll(np.asarray(im), 4, axis=1)))
        return transforms.Compose([shared(size), roll])

    monkeypatch.setattr(data, 'pretrain_geometry', shifted)
    tokenizer.main(['--data', 'demo', '--split', 'val', '--codebook', str(root / 'train'),
                    '--out', str(tmp_path)])
    assert calls == [32]
    assert 'git revision ' in capsys.readouterr().out  # the run prints its revision and arguments
    before, after = np.load(root / 'val' / 'tokens.npy'), np.load(tmp_path / 'tokens.npy')
    assert (after[:, :, 1:] == before[:, :, :-1]).mean() > 0.999


@pytest.mark.slow
def test_two_processes_fit_the_same_codebook(demo_run, tmp_path):
    """torchrun --nproc_per_node=2 (gloo): k-means on rows split unevenly over ranks, with k-means++
    and with a lost centroid to re-seed, and the whole demo command, equal the 1-process results."""
    root, _, _ = demo_run
    script = tmp_path / 'run.py'
    script.write_text(f'''
import sys
sys.path.insert(0, {REPO!r})
import numpy as np, torch, torch.distributed as dist
import tokenizer
from test_tokenizer import blobs
dist.init_process_group('gloo')
rank, out = dist.get_rank(), sys.argv[1]
x = torch.tensor(blobs(n=2001), dtype=torch.float32)
far = torch.cat([x[:11], torch.full((1, 6), 1e3)])
mine = torch.arange(rank, len(x), 2)
pp = tokenizer.kmeans(x[mine], 12, iters=10, seed=3, ids=mine)
lost = tokenizer.kmeans(x[mine], 12, iters=10, init=far, ids=mine)
tokenizer.main(['--data', 'demo', '--split', 'train', '--out', out + '/tok', *{DEMO!r}])
if rank == 0:
    np.savez(out + '/kmeans.npz', pp=pp[0], pp_inertia=pp[1], lost=lost[0])
dist.destroy_process_group()
''')
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': os.path.join(REPO, 'tests')}
    run = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                          '--nproc_per_node=2', str(script), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = np.load(tmp_path / 'kmeans.npz')
    x = torch.tensor(blobs(n=2001), dtype=torch.float32)
    c, inertia = tokenizer.kmeans(x, 12, iters=10, seed=3)
    assert np.allclose(got['pp'], c.numpy(), atol=1e-4)
    assert np.allclose(got['pp_inertia'], inertia, rtol=1e-6)
    c, _ = tokenizer.kmeans(x, 12, iters=10, init=torch.cat([x[:11], torch.full((1, 6), 1e3)]))
    assert np.allclose(got['lost'], c.numpy(), atol=1e-4) and np.abs(c.numpy()).max() < 100
    one, two = root / 'train', tmp_path / 'tok'
    assert np.allclose(np.load(one / 'codebook.npy'), np.load(two / 'codebook.npy'), atol=1e-5)
    assert (np.load(one / 'tokens.npy') == np.load(two / 'tokens.npy')).mean() > 0.999
    n = data.DEMO_SIZES['train']
    m1, m2 = (data.load_tokens(str(d), 'demo', 'train', n, 8)[1] for d in (one, two))
    assert m1['features_fitted'] == m2['features_fitted'] and m2['world_size'] == 2


# the command with CLIP features on an image folder


@pytest.mark.slow
def test_clip_features_end_to_end(tmp_path):
    import clip  # OpenAI's reference code: test-only oracle
    torch.manual_seed(0)
    # a tiny ResNet (512 channels in layer4), no text to tokenize: a tiny vocabulary
    ref = clip.model.CLIP(64, 64, (1, 1, 1, 1), 16, None, 8, 64, 64, 1, 1).eval()
    for name, p in ref.named_parameters():  # CLIP zero-inits bn3: make every block count
        if name.endswith('bn3.weight'):
            torch.nn.init.ones_(p)
    ckpt = str(tmp_path / 'rn.pt')
    torch.save(ref.state_dict(), ckpt)
    rng = np.random.default_rng(0)
    for split, n in (('train', 12), ('val', 5)):
        for i in range(n):
            os.makedirs(tmp_path / 'imgs' / split / 'ab'[i % 2], exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (48 + 7 * i, 90 - 3 * i, 3), dtype=np.uint8)).save(
                tmp_path / 'imgs' / split / 'ab'[i % 2] / f'{i}.jpg')
    good = (tmp_path / 'imgs' / 'train' / 'a' / '0.jpg').read_bytes()
    truncated = good[:len(good) // 2]
    (tmp_path / 'imgs' / 'train' / 'a' / 'broken.jpg').write_bytes(truncated)
    folder, out = str(tmp_path / 'imgs'), str(tmp_path / 'tok')
    with pytest.warns(UserWarning) as caught:
        meta = tokenizer.main(['--data', folder, '--split', 'train', '--clip', ckpt, '--grid', '2',
                               '--vocab', '6',
                               '--sample', '1', '--iters', '5', '--workers', '0', '--out', out])
    bad_path = os.path.join(folder, 'train', 'a', 'broken.jpg')
    skipped = f'skipping unreadable image {bad_path}'
    assert [str(w.message).startswith(skipped) for w in caught].count(True) == 1
    tokenizer.main(['--data', folder, '--split', 'val', '--codebook', out, '--workers', '1',
                    '--out', str(tmp_path / 'val')])
    ds = data.build_dataset(folder, 'train')
    broken = [i for i, (p, _) in enumerate(ds.samples) if p.endswith('broken.jpg')]
    assert meta['skipped'] == broken and meta['features'] == f'clip:{ckpt}'
    assert meta['image_size'] == 64 and meta['feature_dim'] == 512
    assert meta['features_fitted'] == 13 * 4
    codebook = np.load(os.path.join(out, 'codebook.npy'))
    assert codebook.shape == (6, 512)
    # reference features: CLIP's own preprocessing at 64 px, layer4 of the reference model
    layer4 = []
    ref.visual.layer4.register_forward_hook(lambda m, i, o: layer4.append(o))
    for split, token_dir in (('train', out), ('val', str(tmp_path / 'val'))):
        ds = data.build_dataset(folder, split)
        tokens, _ = data.load_tokens(token_dir, folder, split, len(ds), 2, vocab_size=6)
        keep = [i for i in range(len(ds)) if i not in broken or split == 'val']
        images = torch.stack([clip.clip._transform(64)(Image.open(ds.samples[i][0])) for i in keep])
        layer4.clear()
        with torch.no_grad():
            ref.encode_image(images)
        feats = layer4[0].permute(0, 2, 3, 1).reshape(-1, 512)  # [n*G*G, C]
        assert_nearest(tokens[keep], feats.numpy(), codebook)
        assert len(set(tokens[keep].ravel().tolist())) > 1


# bad input: one line, saying what to do


@pytest.mark.parametrize('argv, message', [
    (['--sample', '0'], r'--sample 0.0 is not in \(0, 1\]'),
    (['--sample', '1.5'], r'--sample 1.5 is not in \(0, 1\]'),
    (['--vocab', '70000'], r'--vocab 70000 is not in 1..65536'),
    (['--split', 'val', '--vocab', '40000'],  # 1,000 images x 16 patches x 0.1 sampled
     r'--vocab 40000 is more than the 1[56]\d{2} sampled features: lower --vocab or raise '
     '--sample'),
    (['--features', 'clip', '--patch', '4'], '--patch applies to --features hog or pixels'),
    (['--clip', 'RN50'], '--clip applies to --features clip'),
    (['--data', 'imagenet'], "unknown dataset 'imagenet'"),
    (['--codebook', '/nonexistent'], '--codebook /nonexistent holds no codebook.npy: fit one'),
    (['--batch-size', '0'], '--batch-size must be positive, got 0'),
    (['--workers', '-1'], '--workers must not be negative, got -1'),
])
def test_bad_arguments(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message) as e:
        tokenizer.main(['--out', str(tmp_path / 'out'), *argv])
    assert '\n' not in str(e.value)


def fake_codebook(path, **meta):
    """A token dir holding only what --codebook reads: codebook.npy and meta.json."""
    os.makedirs(path, exist_ok=True)
    np.save(os.path.join(path, 'codebook.npy'), np.zeros((64, 48), np.float32))
    meta = dict(features='pixels', grid=8, vocab_size=64, image_size=32, sample=0.1, iters=3,
                seed=0, features_fitted=32000, inertia=[1.0] * 4, **meta)
    with open(os.path.join(path, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return str(path)


def test_codebook_mismatch(tmp_path):
    codebook = ['--split', 'val', '--codebook', fake_codebook(tmp_path / 'train')]
    with pytest.raises(SystemExit, match=r'--grid 4 does not match the codebook in .* \(grid 8\)'):
        tokenizer.main([*codebook, '--grid', '4', '--out', str(tmp_path)])
    with pytest.raises(SystemExit, match=r'--features clip does not match .* \(features pixels\)'):
        tokenizer.main([*codebook, '--features', 'clip', '--out', str(tmp_path)])
    with pytest.raises(SystemExit, match='is the --codebook dir'):
        tokenizer.main([*codebook, '--out', str(tmp_path / 'train')])
    args = tokenizer.resolve_args(tokenizer.get_args_parser().parse_args([*codebook, '--out', 'v']))
    settings = (args.features, args.grid, args.patch, args.vocab, args.clip)
    assert settings == ('pixels', 8, 4, 64, None)


def test_fit_command_in_the_message_works_when_pasted(tmp_path):
    """The codebook a val run lacks: the message gives the train command with the run's flags."""
    missing = str(tmp_path / 'no such dir')
    with pytest.raises(SystemExit) as e:
        tokenizer.main(['--split', 'val', '--codebook', missing, '--grid', '14', '--patch', '16',
                        '--features', 'pixels', '--out', str(tmp_path / 'val')])
    fit = shlex.split(str(e.value).split('`')[1])
    assert fit[:2] == ['python', 'tokenizer.py'] and '--codebook' not in fit
    args = tokenizer.resolve_args(tokenizer.get_args_parser().parse_args(fit[2:]))
    settings = (args.split, args.out, args.grid, args.patch, args.features)
    assert settings == ('train', missing, 14, 16, 'pixels')


def test_clip_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / 'notes.txt').write_text('not a checkpoint\n')
    with pytest.raises(SystemExit, match=r'--clip: cannot read .*notes.txt .*TorchScript archive '
                       'or state dict') as e:
        tokenizer.main(['--split', 'val', '--features', 'clip', '--grid', '1', '--device', 'cpu',
                        '--clip', str(tmp_path / 'notes.txt'), '--out', str(tmp_path / 'out')])
    assert '\n' not in str(e.value)
