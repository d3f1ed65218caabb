"""visualize.py: every subcommand, its pictures read back from their pixels (the masks of
build_masks, the token maps of tokens.npy, the patches of the demo images), token names against
OpenAI's reference CLIP, predictions recomputed. Fast tests use small hand-made artefacts; the
slow ones run the real tokenizer and pretrain.py."""
import json
import os
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

import data
import model
import visualize

ALLOWED, BLOCKED = np.array(visualize.ALLOWED), np.array(visualize.GHOST)
N_TRAIN = data.DEMO_SIZES['train']  # the demo's train images; index N_TRAIN is past the end


def pixels(path):
    return np.asarray(Image.open(path).convert('RGB')).astype(int)


def find(arr, template):
    """Top-left corners (y, x) where `template` [h, w, 3] occurs exactly in `arr`."""
    h, w, _ = template.shape
    ys, xs = np.nonzero((arr == template[0, 0]).all(-1))
    return [(int(y), int(x)) for y, x in zip(ys, xs)
            if y + h <= arr.shape[0] and x + w <= arr.shape[1]
            and np.array_equal(arr[y:y + h, x:x + w], template)]


# ---------------------------------------------------------------------------------------------
# artefacts: small hand-made ones (fast), and ones made by the real tools (slow)


@pytest.fixture(scope='module')
def demo_tokens(tmp_path_factory):
    """A pixels token dir over the demo train set in tokenizer.py's format: random tokens on an
    8x8 grid of 4 px patches (the checkpoints' ViT below)."""
    out = str(tmp_path_factory.mktemp('tok') / 'demo')
    tokens = np.random.default_rng(0).integers(0, 32, (N_TRAIN, 8, 8))
    data.write_tokens(out, tokens, np.zeros((32, 48)), {
        'dataset': 'demo', 'split': 'train', 'num_images': N_TRAIN, 'grid': 8, 'vocab_size': 32,
        'features': 'pixels', 'image_size': 32, 'skipped': []})
    return out


@pytest.fixture(scope='module')
def checkpoints(demo_tokens, tmp_path_factory):
    """Untrained tiny Pretrainers (mapet, mim) saved in pretrain.py's ckpt.pt format."""
    root, paths = tmp_path_factory.mktemp('ckpt'), {}
    for objective in ('mapet', 'mim'):
        torch.manual_seed(0)
        backbone = model.VisionTransformer(img_size=32, patch_size=4, embed_dim=16, depth=1,
                                           num_heads=2)
        pre = model.Pretrainer(backbone, objective, vocab_size=32, cut=20, mask_ratio=0.5)
        paths[objective] = str(root / f'{objective}.pt')
        torch.save({'model': pre.state_dict(), 'config': dict(backbone.config), 'step': 0,
                    'args': {'objective': objective, 'cut': 20, 'mask_ratio': 0.5, 'data': 'demo',
                             'data_root': 'data'},
                    'tokens': {'dir': demo_tokens, 'vocab_size': 32}}, paths[objective])
    return paths


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Two tiny pre-training runs (mapet, mim) by the real tools: dirs with ckpt.pt, log.jsonl."""
    import pretrain
    import tokenizer
    root = tmp_path_factory.mktemp('runs')
    tokenizer.main(['--data', 'demo', '--split', 'train', '--out', str(root / 'tok'), '--vocab',
                    '32', '--iters', '2'])
    for name, objective, steps in (('run_a', 'mapet', 3), ('run_b', 'mim', 2)):
        pretrain.main(['--objective', objective, '--tokens', str(root / 'tok'), '--out',
                       str(root / name), '--steps', str(steps), '--batch-size', '8',
                       '--log-every', '1', '--color-jitter', '0'])
    return root


@pytest.fixture(scope='module')
def clip_tokens(tmp_path_factory):
    """A random small CLIP ResNet (OpenAI's reference code) and a clip-feature token dir of a
    tiny image folder naming it; returns (reference model, checkpoint path, token dir)."""
    import clip  # OpenAI's reference code: test-only oracle
    root = tmp_path_factory.mktemp('clip')
    torch.manual_seed(0)
    ref = clip.model.CLIP(64, 64, (1, 1, 1, 1), 16, None, 77, 49408, 64, 1, 1).eval()  # layer4: 512
    ckpt = str(root / 'rn.pt')
    torch.save(ref.state_dict(), ckpt)
    rng = np.random.default_rng(0)
    for i in range(8):
        os.makedirs(folder := root / 'imgs' / 'train' / 'ab'[i % 2], exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(folder / f'{i}.png')
    out = str(root / 'tok')
    # A random network's features all point nearly one way, so real centroids would all get one
    # name and a mix-up of tokens could not show: spread centroids, in tokenizer.py's format.
    data.write_tokens(out, rng.integers(0, 5, (8, 2, 2)), rng.standard_normal((5, 512)), {
        'dataset': data.dataset_id(str(root / 'imgs')), 'split': 'train', 'num_images': 8,
        'grid': 2, 'vocab_size': 5, 'features': f'clip:{ckpt}', 'image_size': 64, 'skipped': []})
    return ref, ckpt, out


# ---------------------------------------------------------------------------------------------
# masks


def read_matrix(arr, rows, cols, cell, x_from=0):
    """The boolean matrix drawn right of column x_from: its top-left cell is the first green pixel
    in raster order (the CLS column is green in every row), read at every cell's centre."""
    ys, xs = np.nonzero((arr[:, x_from:] == ALLOWED).all(-1))
    y0, x0 = ys[0], xs[0] + x_from
    centres = arr[y0 + cell // 2 + cell * np.arange(rows)[:, None],
                  x0 + cell // 2 + cell * np.arange(cols)[None]]
    allowed, blocked = (centres == ALLOWED).all(-1), (centres == BLOCKED).all(-1)
    assert (allowed | blocked).all()                                  # every centre is a cell
    below = arr[y0 + rows * cell + cell // 2, x0 + cell // 2]         # and the matrix ends there
    assert not ((below == ALLOWED).all() or (below == BLOCKED).all())
    return allowed, x0 + cols * cell


@pytest.mark.parametrize('objective, n, cut', [('pim', 4, 1), ('mapet', 4, 1), ('pim', 6, 2),
                                               ('mapet', 6, 2)])
def test_masks_picture_reproduces_build_masks(objective, n, cut, tmp_path):
    paths = visualize.main(['masks', '--objective', objective, '--num-patches', str(n), '--cut',
                            str(cut), '--out', str(tmp_path)])
    assert len(paths) == (2 if n == 4 else 1)                         # N = 6 is no square: no image
    content, query = model.build_masks(objective, n, cut)
    arr = pixels(paths[0])
    drawn_content, right = read_matrix(arr, *content.shape, 16)       # 16 px cells for a small N
    drawn_query, _ = read_matrix(arr, *query.shape, 16, x_from=right + 2)
    assert np.array_equal(drawn_content, content.numpy())
    assert np.array_equal(drawn_query, query.numpy())


@pytest.mark.parametrize('objective', ['mim', 'pim', 'mapet'])
def test_what_targets_see_follows_eq_1_and_2(objective):
    """Raster-order visibility from the definitions (Sec. 3-4.1): target t (rank t) sees the content
    of the visible patches and of targets ranked before it; its own position always; pim no other
    position, mapet the positions of all later targets; mim the unmasked content, every position."""
    N, cut = 9, 3
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(5))
    content, position = visualize.what_targets_see(objective, perm, cut)
    rank = {int(n): r - cut for r, n in enumerate(perm)}              # visible: negative rank
    for t in range(N - cut):
        for n in range(N):
            r = rank[n]
            if objective == 'mim':
                assert content[t, n] == (r < 0) and position[t, n] == (r >= 0)
            else:
                assert content[t, n] == (r < t)
                assert position[t, n] == (r == t or (objective == 'mapet' and r > t))


def test_image_panels_show_what_each_target_sees(tmp_path):
    """N = 16, cut = 5, every step shown: a visible patch appears intact in all 3 x (1 + 11) panels;
    the target of rank r only in the pim and mapet panels of the later steps t > r."""
    paths = visualize.main(['masks', '--num-patches', '16', '--cut', '5', '--index', '2', '--seed',
                            '1', '--out', str(tmp_path)])
    arr = pixels(paths[1])
    image = np.asarray(data.pretrain_geometry(96)(data.DemoDataset('train')[2][0])).astype(int)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1)).tolist()

    def patch(n):
        return image[24 * (n // 4):24 * (n // 4 + 1), 24 * (n % 4):24 * (n % 4 + 1)]
    for n in perm[:5]:
        assert len(find(arr, patch(n))) == 3 * 12
    for r, n in enumerate(perm[5:]):
        assert len(find(arr, patch(n))) == 2 * (10 - r)


# ---------------------------------------------------------------------------------------------
# token files: codebook patches, token maps, names


def test_codebook_rows_hold_patches_of_their_token(demo_tokens, tmp_path):
    tokens, _ = data.load_tokens(demo_tokens, 'demo', 'train', N_TRAIN, 8)
    counts = visualize.token_counts(tokens, 32, skipped=[7])
    assert counts.sum() == (N_TRAIN - 1) * 64 and np.array_equal(
        counts, np.bincount(np.delete(np.asarray(tokens), 7, 0).ravel(), minlength=32))
    top = list(np.argsort(-counts, kind='stable')[:3])
    found = visualize.find_examples(tokens, top, 5, skipped=[7])
    for k, hits in found.items():
        images = {i for i, _, _ in hits}
        assert len(hits) == 5 and len(images) == 5 and 7 not in images
        assert all(tokens[i, r, c] == k for i, r, c in hits)
    path, = visualize.main(['codebook', '--tokens', demo_tokens, '--top', '3', '--per-token', '5',
                            '--out', str(tmp_path)])
    # every patch shown for the top token, cut from its demo image and shown 12x, is in the picture
    for i, r, c in visualize.find_examples(tokens, top[:1], 5)[top[0]]:
        patch = data.DemoDataset('train').images[i][4 * r:4 * r + 4, 4 * c:4 * c + 4]
        assert find(pixels(path), patch.repeat(12, 0).repeat(12, 1).astype(int))


def test_token_maps_read_back(demo_tokens, tmp_path):
    path, = visualize.main(['tokens', '--tokens', demo_tokens, '--index', '7', '0', '--out',
                            str(tmp_path)])
    arr = pixels(path)
    tokens = np.load(os.path.join(demo_tokens, 'tokens.npy'))
    cell = visualize.TOKEN_CELL
    found = []
    for i in (7, 0):
        colours = visualize.PALETTE[tokens[i]].astype(int)             # (8, 8, 3)
        # each cell's corner (the id is written in the middle): the G x G colours at pitch `cell`
        ys, xs = np.nonzero((arr == colours[0, 0]).all(-1))
        hits = [(y, x) for y, x in zip(ys, xs) if y + 7 * cell < arr.shape[0] and
                x + 7 * cell < arr.shape[1] and np.array_equal(
                    arr[y + cell * np.arange(8)[:, None], x + cell * np.arange(8)[None]], colours)]
        assert hits, f'token map of image {i} not found'
        found.append(hits[0][0])
    assert found[0] < found[1]                                         # rows in the order asked


def test_bad_index_and_top_say_so_in_one_line(demo_tokens, tmp_path):
    for argv, message in ((['tokens', '--index', str(N_TRAIN)],
                           f'no image {N_TRAIN}: pass an --index in 0'),
                          (['codebook', '--top', '0'], '--top and --per-token must be at least 1')):
        with pytest.raises(SystemExit, match=message) as e:
            visualize.main([*argv, '--tokens', demo_tokens, '--out', str(tmp_path)])
        assert '\n' not in str(e.value)


@pytest.mark.slow
def test_names_match_reference_clip_zero_shot(clip_tokens, tmp_path):
    import clip
    ref, ckpt, token_dir = clip_tokens
    classes = ['dog', 'cat', 'airplane', 'car', 'tree', 'house', 'bird', 'flower']
    paths = visualize.main(['names', '--tokens', token_dir, '--clip', ckpt, '--classes',
                            ','.join(classes), '--top', '3', '--per-token', '2', '--out',
                            str(tmp_path)])
    with open(paths[0]) as f:
        names = json.load(f)['tokens']
    assert Image.open(paths[1]).size[0] > 200
    # Reference: the embedding of a layer4 map whose every position holds the centroid, through the
    # reference attention pool with its positional embedding zeroed (what the projection means).
    codebook = torch.from_numpy(np.load(os.path.join(token_dir, 'codebook.npy')))
    pool = ref.visual.attnpool
    with torch.no_grad():
        pool.positional_embedding.zero_()
        image = pool(codebook[:, :, None, None].expand(-1, -1, 2, 2))                   # (K, E)
        text = ref.encode_text(clip.tokenize([f'a photo of a {c}.' for c in classes]))
        cosine = (torch.nn.functional.normalize(image, dim=-1)
                  @ torch.nn.functional.normalize(text, dim=-1).T)
    assert len(set(cosine.argmax(1).tolist())) > 1                     # it tells tokens apart
    for k in range(len(codebook)):
        assert names[str(k)]['name'] == classes[int(cosine[k].argmax())]
        assert names[str(k)]['cosine'] == pytest.approx(float(cosine[k].max()), abs=1e-4)


def test_names_refuses_pixels_and_says_offline(demo_tokens, clip_tokens, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match='is a pixels codebook: only CLIP-feature codebooks') as e:
        visualize.main(['names', '--tokens', demo_tokens, '--classes', 'a,b', '--out',
                        str(tmp_path)])
    assert '\n' not in str(e.value)
    with pytest.raises(SystemExit, match='no names in --classes') as e:
        visualize.main(['names', '--tokens', demo_tokens, '--classes', ',', '--out', str(tmp_path)])
    monkeypatch.setenv('CLIP_CACHE', str(tmp_path / 'empty'))

    def offline(*args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(urllib.request, 'urlopen', offline)
    with pytest.raises(SystemExit, match=r'cannot download https://\S+/RN50.pt') as e:
        visualize.main(['names', '--tokens', clip_tokens[2], '--clip', 'RN50', '--classes', 'a,b',
                        '--out', str(tmp_path)])
    assert '\n' not in str(e.value)


# ---------------------------------------------------------------------------------------------
# curves and predictions


def write_log(path, steps):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.writelines(json.dumps({'step': s, 'loss': 4 - s / 10, 'token_acc': s / 100}) + '\n'
                     for s in steps)
    return path


def test_curves_draw_every_run(tmp_path):
    logs = [write_log(str(tmp_path / 'run_a' / 'log.jsonl'), range(1, 40)),
            write_log(str(tmp_path / 'run_b' / 'log.jsonl'), [1])]      # a one-line log: a dot
    path, = visualize.main(['curves', *logs, '--out', str(tmp_path)])
    arr = pixels(path)
    for colour in visualize.LINE_COLOURS[:2]:                           # each run's line or dot
        assert (arr == colour).all(-1).sum() > 40
    assert (arr == visualize.LINE_COLOURS[2]).all(-1).sum() == 0
    with pytest.raises(SystemExit, match='1 --labels for 2 logs'):
        visualize.main(['curves', *logs, '--labels', 'a', '--out', str(tmp_path)])


def test_read_log_resumed_and_torn(tmp_path):
    lines = [{'step': s, 'loss': loss, 'token_acc': acc}
             for s, loss, acc in ((1, 3.0, 0.1), (2, 2.5, 0.2), (2, 2.4, 0.25), (3, 2.0, 0.3))]
    path = tmp_path / 'log.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in lines) + '{"step": 4, "lo')  # killed
    assert visualize.read_log(str(path)).tolist() == [[1, 3.0, 0.1], [2, 2.4, 0.25], [3, 2.0, 0.3]]
    path.write_text('not json\n' + json.dumps(lines[0]) + '\n')
    with pytest.raises(ValueError, match='line 1 is not a pretrain.py log line'):
        visualize.read_log(str(path))


def check_predictions(ckpt_path, tmp_path):
    """The JSON's predictions are the checkpoint's Pretrainer's, recomputed on demo image 7."""
    json_path, png = visualize.main(['predictions', '--checkpoint', ckpt_path, '--index', '7',
                                     '--seed', '3', '--out', str(tmp_path)])
    with open(json_path) as f:
        shown = json.load(f)
    ckpt = torch.load(ckpt_path, weights_only=True)
    G = ckpt['config']['img_size'] // ckpt['config']['patch_size']  # the token grid
    N = G * G
    assert Image.open(png).width > 3 * G * visualize.TOKEN_CELL
    pre = model.Pretrainer(model.VisionTransformer(**ckpt['config']), ckpt['args']['objective'],
                           vocab_size=32, cut=ckpt['args']['cut'],
                           mask_ratio=ckpt['args']['mask_ratio']).eval()
    pre.load_state_dict(ckpt['model'])
    img = (data.DemoDataset('train').images[7] / 255.0 - data.IMAGENET_MEAN) / data.IMAGENET_STD
    x = torch.tensor(img, dtype=torch.float32).permute(2, 0, 1)[None]
    tokens = np.load(os.path.join(ckpt['tokens']['dir'], 'tokens.npy'))
    tokens = torch.from_numpy(tokens[7].astype(np.int64)).reshape(1, N)
    targets = [r['patch'] for r in shown['targets']]
    assert sorted(targets + shown['visible']) == list(range(N))
    with torch.no_grad():
        if pre.two_stream:
            # the visible patches attend to each other alike: their order changes no prediction
            assert len(targets) == N - pre.cut
            logits, _ = pre(x, tokens, perm=torch.tensor([shown['visible'] + targets]))
        else:
            assert targets == sorted(targets) and len(targets) == pre.num_masked
            mask = torch.zeros(1, N, dtype=torch.bool)
            mask[0, targets] = True
            logits, _ = pre(x, tokens, mask=mask)
    prob = logits[0].softmax(-1)
    for t, r in enumerate(shown['targets']):
        assert r['step'] == t + 1 and r['true'] == int(tokens[0, r['patch']])
        assert r['pred'] == int(prob[t].argmax())
        assert r['prob'] == pytest.approx(float(prob[t].max()), abs=1e-5)


@pytest.mark.parametrize('objective', ['mapet', 'mim'])
def test_predictions_are_the_models(checkpoints, objective, tmp_path):
    check_predictions(checkpoints[objective], tmp_path)


def test_predictions_bad_index_says_so_in_one_line(checkpoints, tmp_path):
    with pytest.raises(SystemExit, match=f'no image {N_TRAIN}: pass an --index in 0') as e:
        visualize.main(['predictions', '--checkpoint', checkpoints['mim'], '--index',
                        str(N_TRAIN), '--out', str(tmp_path)])
    assert '\n' not in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize('run', ['run_a', 'run_b'])
def test_pictures_of_real_runs(runs, run, tmp_path):
    """End to end: pretrain.py's own ckpt.pt and log.jsonl, read by predictions and curves."""
    check_predictions(str(runs / run / 'ckpt.pt'), tmp_path)
    path, = visualize.main(['curves', str(runs / run / 'log.jsonl'), '--out', str(tmp_path)])
    assert (pixels(path) == visualize.LINE_COLOURS[0]).all(-1).sum() > 10
