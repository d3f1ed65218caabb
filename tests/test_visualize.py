"""visualize.py: every subcommand on artefacts made by the real tools at tiny settings, pictures
read back from their pixels (the masks of build_masks, the token maps of tokens.npy, the patches
of the demo images), token names against OpenAI's reference CLIP, predictions recomputed."""
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
import pretrain
import tokenizer
import visualize

ALLOWED, BLOCKED = np.array(visualize.ALLOWED), np.array(visualize.BLOCKED)


def pixels(path):
    return np.asarray(Image.open(path).convert('RGB')).astype(int)


def find(arr, template):
    """Top-left corners (y, x) where `template` [h, w, 3] occurs exactly in `arr`."""
    h, w, _ = template.shape
    ys, xs = np.nonzero((arr == template[0, 0]).all(-1))
    hits = []
    for y, x in zip(ys, xs):
        if y + h <= arr.shape[0] and x + w <= arr.shape[1] and np.array_equal(arr[y:y + h, x:x + w], template):
            hits.append((int(y), int(x)))
    return hits


# ---------------------------------------------------------------------------------------------
# artefacts made by the real tools, once per module


@pytest.fixture(scope='module')
def demo_tokens(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('tok') / 'demo')
    tokenizer.main(['--data', 'demo', '--split', 'train', '--out', out, '--vocab', '32', '--iters', '2'])
    return out


@pytest.fixture(scope='module')
def runs(demo_tokens, tmp_path_factory):
    """Two tiny pre-training runs (mapet, mim) on the demo tokens: their dirs hold ckpt.pt, log.jsonl."""
    root = tmp_path_factory.mktemp('runs')
    for name, objective, steps in (('run_a', 'mapet', 3), ('run_b', 'mim', 2)):
        pretrain.main(['--objective', objective, '--tokens', demo_tokens, '--out', str(root / name), '--steps',
                       str(steps), '--batch-size', '8', '--log-every', '1', '--color-jitter', '0'])
    return root


@pytest.fixture(scope='module')
def clip_tokens(tmp_path_factory):
    """A random small CLIP ResNet (OpenAI's reference code) and a clip-feature token dir made with it
    by tokenizer.py on a tiny image folder; returns (reference model, checkpoint path, token dir)."""
    import clip                                               # OpenAI's reference code: test-only oracle
    root = tmp_path_factory.mktemp('clip')
    torch.manual_seed(0)
    ref = clip.model.CLIP(64, 64, (1, 1, 1, 1), 16, None, 77, 49408, 64, 1, 1).eval()  # layer4: 512 channels
    ckpt = str(root / 'rn.pt')
    torch.save(ref.state_dict(), ckpt)
    rng = np.random.default_rng(0)
    for i in range(8):
        folder = root / 'imgs' / 'train' / 'ab'[i % 2]
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(folder / f'{i}.png')
    out = str(root / 'tok')
    tokenizer.main(['--data', str(root / 'imgs'), '--split', 'train', '--clip', ckpt, '--grid', '2', '--vocab', '5',
                    '--sample', '1', '--iters', '3', '--workers', '0', '--out', out])
    # A random network's layer4 features all point nearly the same way, so its centroids would all
    # get one name and a mix-up of tokens could not show: spread the centroids (same file format).
    np.save(os.path.join(out, 'codebook.npy'), rng.standard_normal((5, 512)).astype(np.float32))
    return ref, ckpt, out


# ---------------------------------------------------------------------------------------------
# masks


def read_matrix(arr, rows, cols, cell, x_from=0):
    """The boolean matrix drawn right of column x_from: its top-left cell is the first green pixel
    in raster order (the CLS column is green in every row), read at every cell's centre."""
    ys, xs = np.nonzero((arr[:, x_from:] == ALLOWED).all(-1))
    y0, x0 = ys[0], xs[0] + x_from
    centres = arr[y0 + cell // 2 + cell * np.arange(rows)[:, None], x0 + cell // 2 + cell * np.arange(cols)[None]]
    allowed, blocked = (centres == ALLOWED).all(-1), (centres == BLOCKED).all(-1)
    assert (allowed | blocked).all()                                  # every centre is a cell
    below = arr[y0 + rows * cell + cell // 2, x0 + cell // 2]         # and the matrix ends where it should
    assert not ((below == ALLOWED).all() or (below == BLOCKED).all())
    return allowed, x0 + cols * cell


@pytest.mark.parametrize('objective, n, cut', [('pim', 4, 1), ('mapet', 4, 1), ('pim', 6, 2), ('mapet', 6, 2)])
def test_masks_picture_reproduces_build_masks(objective, n, cut, tmp_path):
    paths = visualize.main(['masks', '--objective', objective, '--num-patches', str(n), '--cut', str(cut),
                            '--cell', '12', '--out', str(tmp_path)])
    assert len(paths) == (2 if n == 4 else 1)                         # N = 6 is no square: no image panels
    content, query = model.build_masks(objective, n, cut)
    arr = pixels(paths[0])
    drawn_content, right = read_matrix(arr, *content.shape, 12)
    drawn_query, _ = read_matrix(arr, *query.shape, 12, x_from=right + 2)
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
    rank = {int(n): r - cut for r, n in enumerate(perm)}              # visible patches: negative rank
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
    paths = visualize.main(['masks', '--num-patches', '16', '--cut', '5', '--index', '2', '--seed', '1',
                            '--out', str(tmp_path)])
    arr = pixels(paths[1])
    image = np.asarray(data.pretrain_geometry(96)(data.DemoDataset('train')[2][0])).astype(int)   # 4 x 4 of 24 px
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1)).tolist()
    patch = lambda n: image[24 * (n // 4):24 * (n // 4 + 1), 24 * (n % 4):24 * (n % 4 + 1)]
    for n in perm[:5]:
        assert len(find(arr, patch(n))) == 3 * 12
    for r, n in enumerate(perm[5:]):
        assert len(find(arr, patch(n))) == 2 * (10 - r)


# ---------------------------------------------------------------------------------------------
# token files: codebook patches, token maps


def test_codebook_rows_hold_patches_of_their_token(demo_tokens, tmp_path):
    tokens, meta = data.load_tokens(demo_tokens, 'demo', 'train', 5000, 8)
    counts = np.bincount(np.asarray(tokens).ravel(), minlength=32)
    top = list(np.argsort(-counts, kind='stable')[:3])
    assert visualize.choose_tokens(None, 3, visualize.token_counts(tokens, 32)) == top
    found = visualize.find_examples(tokens, top, 5)
    for k, hits in found.items():
        assert len(hits) == 5 and len({i for i, _, _ in hits}) == 5     # from distinct images
        assert all(tokens[i, r, c] == k for i, r, c in hits)
    path, = visualize.main(['codebook', '--tokens', demo_tokens, '--top', '3', '--per-token', '5',
                            '--out', str(tmp_path)])
    # the first patch of the top token, cut from the demo image and shown 12x, is in the picture
    i, r, c = found[top[0]][0]
    patch = data.DemoDataset('train').images[i][4 * r:4 * r + 4, 4 * c:4 * c + 4].repeat(12, 0).repeat(12, 1)
    assert find(pixels(path), patch.astype(int))


def test_token_maps_read_back(demo_tokens, tmp_path):
    path, = visualize.main(['tokens', '--tokens', demo_tokens, '--index', '7', '0', '--out', str(tmp_path)])
    arr = pixels(path)
    tokens = np.load(os.path.join(demo_tokens, 'tokens.npy'))
    cell = visualize.TOKEN_CELL
    found = []
    for i in (7, 0):
        colours = np.array([visualize.token_colour(k) for k in tokens[i].ravel()]).reshape(8, 8, 3)
        # each cell's corner (the id is written in the middle): the G x G colours at pitch `cell`
        ys, xs = np.nonzero((arr == colours[0, 0]).all(-1))
        hits = [(y, x) for y, x in zip(ys, xs) if y + 7 * cell < arr.shape[0] and x + 7 * cell < arr.shape[1] and
                np.array_equal(arr[y + cell * np.arange(8)[:, None], x + cell * np.arange(8)[None]], colours)]
        assert hits, f'token map of image {i} not found'
        found.append(hits[0][0])
    assert found[0] < found[1]                                         # rows in the order asked


# ---------------------------------------------------------------------------------------------
# names


def test_names_match_reference_clip_zero_shot(clip_tokens, tmp_path):
    import clip
    ref, ckpt, token_dir = clip_tokens
    classes = ['dog', 'cat', 'airplane', 'car', 'tree', 'house', 'bird', 'flower']
    paths = visualize.main(['names', '--tokens', token_dir, '--clip', ckpt, '--classes', ','.join(classes),
                            '--top', '3', '--per-token', '2', '--out', str(tmp_path)])
    names = json.load(open(paths[0]))['tokens']
    assert Image.open(paths[1]).size[0] > 200
    # Reference: the embedding of a layer4 map whose every position holds the centroid, through the
    # reference attention pool with its positional embedding zeroed (what the projection stands for).
    codebook = torch.from_numpy(np.load(os.path.join(token_dir, 'codebook.npy')))
    pool = ref.visual.attnpool
    with torch.no_grad():
        pool.positional_embedding.zero_()
        image = pool(codebook[:, :, None, None].expand(-1, -1, 2, 2))                   # (K, E)
        text = ref.encode_text(clip.tokenize([f'a photo of a {c}.' for c in classes]))
        cosine = torch.nn.functional.normalize(image, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    assert len(set(cosine.argmax(1).tolist())) > 1                     # the check can tell tokens apart
    for k in range(len(codebook)):
        assert names[str(k)]['name'] == classes[int(cosine[k].argmax())]
        assert names[str(k)]['cosine'] == pytest.approx(float(cosine[k].max()), abs=1e-4)


def test_names_refuses_pixels_and_says_offline(demo_tokens, clip_tokens, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match='is a pixels codebook: only CLIP-feature codebooks') as e:
        visualize.main(['names', '--tokens', demo_tokens, '--classes', 'a,b', '--out', str(tmp_path)])
    assert '\n' not in str(e.value)
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


def test_curves_draw_every_run(runs, tmp_path):
    logs = [str(runs / 'run_a' / 'log.jsonl'), str(runs / 'run_b' / 'log.jsonl')]
    assert visualize.run_label(logs[0]) == 'run_a (mapet)' and visualize.run_label(logs[1]) == 'run_b (mim)'
    path, = visualize.main(['curves', *logs, '--out', str(tmp_path)])
    arr = pixels(path)
    for colour in visualize.LINE_COLOURS[:2]:                           # each run's line and legend entry
        assert (arr == colour).all(-1).sum() > 100
    assert (arr == visualize.LINE_COLOURS[2]).all(-1).sum() == 0


def test_read_log_resumed_and_torn(tmp_path):
    lines = [dict(step=1, loss=3.0, token_acc=0.1), dict(step=2, loss=2.5, token_acc=0.2),
             dict(step=2, loss=2.4, token_acc=0.25), dict(step=3, loss=2.0, token_acc=0.3)]
    path = tmp_path / 'log.jsonl'
    path.write_text(''.join(json.dumps(l) + '\n' for l in lines) + '{"step": 4, "lo')    # resumed, then killed
    assert visualize.read_log(str(path)) == [(1, 3.0, 0.1), (2, 2.4, 0.25), (3, 2.0, 0.3)]
    path.write_text('not json\n' + json.dumps(lines[0]) + '\n')
    with pytest.raises(ValueError, match='line 1 is not JSON'):
        visualize.read_log(str(path))


def test_nice_ticks_span_the_range():
    for lo, hi in ((0.013, 0.87), (1, 1248), (3.46, 3.55), (2.0, 2.0)):
        ticks, labels = visualize.nice_ticks(lo, hi)
        step = ticks[1] - ticks[0]
        assert ticks[0] <= lo and ticks[-1] >= hi and 3 <= len(ticks) <= 12
        assert round(step / 10 ** np.floor(np.log10(step)), 6) in (1, 2, 5) and len(set(labels)) == len(labels)


@pytest.mark.parametrize('run', ['run_a', 'run_b'])
def test_predictions_are_the_models(runs, run, tmp_path):
    ckpt_path = str(runs / run / 'ckpt.pt')
    json_path, png = visualize.main(['predictions', '--checkpoint', ckpt_path, '--index', '7', '--seed', '3',
                                     '--out', str(tmp_path)])
    shown = json.load(open(json_path))
    assert Image.open(png).width > 16 * 48
    # recompute: the checkpoint's Pretrainer on demo image 7, without colour jitter
    ckpt = torch.load(ckpt_path, weights_only=True)
    pre = model.Pretrainer(model.VisionTransformer(**ckpt['config']), ckpt['args']['objective'], vocab_size=32).eval()
    pre.load_state_dict(ckpt['model'])
    img = (data.DemoDataset('train').images[7] / 255.0 - data.IMAGENET_MEAN) / data.IMAGENET_STD
    x = torch.tensor(img, dtype=torch.float32).permute(2, 0, 1)[None]
    tokens = np.load(os.path.join(ckpt['tokens']['dir'], 'tokens.npy'))
    tokens = torch.from_numpy(tokens[7].astype(np.int64)).reshape(1, 64)
    targets = [r['patch'] for r in shown['targets']]
    assert sorted(targets + shown['visible']) == list(range(64))
    with torch.no_grad():
        if pre.two_stream:
            # the visible patches attend to each other alike, so their order cannot change a prediction
            assert len(targets) == 64 - pre.cut
            logits, _ = pre(x, tokens, perm=torch.tensor([shown['visible'] + targets]))
        else:
            assert targets == sorted(targets) and len(targets) == pre.num_masked
            mask = torch.zeros(1, 64, dtype=torch.bool)
            mask[0, targets] = True
            logits, _ = pre(x, tokens, mask=mask)
    prob = logits[0].softmax(-1)
    for t, r in enumerate(shown['targets']):
        assert r['step'] == t + 1 and r['true'] == int(tokens[0, r['patch']])
        assert r['pred'] == int(prob[t].argmax()) and r['prob'] == pytest.approx(float(prob[t].max()), abs=1e-5)
