"""Pictures of what the other stages compute, as PNGs (and JSON numbers) in --out:

    python visualize.py masks --objective mapet --num-patches 16 --cut 5   # Fig. 2b-c and Fig. 1
    python visualize.py codebook --tokens runs/tokens/demo_hog             # Fig. 3-5
    python visualize.py names --tokens tokens/in1k_rn50 --classes classes.txt   # Sec. 5.3
    python visualize.py tokens --tokens runs/tokens/demo_hog --index 0 1 2 # token maps
    python visualize.py curves runs/pretrain_*/log.jsonl                   # loss, token accuracy
    python visualize.py predictions --checkpoint runs/pretrain_mapet/ckpt.pt   # Eq. 1-2

Cells are whole pixels, so the tests read the pictures back. Shapes: N patches, M targets,
L content length, K vocabulary, C feature width, E CLIP joint width, G grid side, S picture side.
"""
import argparse
import functools
import json
import math
import os
import pathlib

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torchvision.utils import draw_bounding_boxes, make_grid

import clip_model
import data
import model
import training

WHITE, BLACK, GHOST, ALLOWED = (255, 255, 255), (0, 0, 0), (226, 226, 226), (40, 160, 70)
BLUE, RED, GREEN = (25, 95, 230), (215, 30, 30), (30, 150, 50)
LINE_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
PALETTE = np.random.default_rng(0).integers(40, 256, (2 ** 16, 3)).astype(np.uint8)  # by token id
TOKEN_CELL = 32  # px per token: room for a 4-digit id
font = functools.cache(ImageFont.load_default)  # font(size), Pillow >= 10.1


def text(lines, big=13, width=0):
    """Lines on white, the first in a `big` font; a line is str or (str, colour)."""
    lines = [(s, BLACK) if isinstance(s, str) else s for s in lines]
    w = max([width] + [math.ceil(font(big).getlength(s)) + 8 for s, _ in lines])
    img = Image.new('RGB', (w, big + 19 * len(lines)), WHITE)
    for i, (s, c) in enumerate(lines):
        ImageDraw.Draw(img).text((4, big + 19 * i - 11 if i else 3), s, c, font(12 if i else big))
    return img


def stack(images, vertical=False, gap=8):
    sizes = [im.size[::-1] if vertical else im.size for im in images]  # along, across
    size = (sum(a for a, _ in sizes) + gap * (len(images) - 1), max(b for _, b in sizes))
    out = Image.new('RGB', size[::-1] if vertical else size, WHITE)
    for im, at in zip(images, np.cumsum([0] + [a + gap for a, _ in sizes]).tolist()):
        out.paste(im, (0, at) if vertical else (at, 0))
    return out


def save(out_dir, name, body, *head):
    """A dict as JSON, or a picture under its title and notes."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    if isinstance(body, dict):
        pathlib.Path(path).write_text(json.dumps(body, indent=1))
    else:
        ImageOps.expand(stack([text(head, 16), body], True), 16, WHITE).save(path)
    print(path)
    return path


def view_panel(pixels, G, content, framed=(), colours=(), labels=None, width=None):
    """A G x G grid picture (3, S, S): unseen content faded."""
    p = pixels.shape[-1] // G
    seen = content.view(G, G).repeat_interleave(p, 0).repeat_interleave(p, 1)  # (S, S)
    img = torch.where(seen, pixels, (pixels.float().mean(0) * 0.12 + 204).byte())
    if len(framed):
        xy = torch.tensor([[n % G, n // G] for n in framed]) * p  # top left
        img = draw_bounding_boxes(img, torch.cat([xy, xy + p - 1], 1), labels, list(colours),
                                  width=width or max(2, p // 10), label_colors=BLACK)
    return img


def token_map(tokens):
    """(3, S, S) uint8: each token's id on its colour."""
    colours = PALETTE[tokens]  # (G, G, 3)
    img = Image.fromarray(colours.repeat(TOKEN_CELL, 0).repeat(TOKEN_CELL, 1))
    for (r, c), k in np.ndenumerate(tokens):
        ImageDraw.Draw(img).text(((c + 0.5) * TOKEN_CELL, (r + 0.5) * TOKEN_CELL), str(k),
                                 BLACK if colours[r, c].sum() > 380 else WHITE,
                                 font(11 if k < 1000 else 9), anchor='mm')
    return TF.pil_to_tensor(img)


def image_at(dataset, index, size, side=None):
    """(image cropped as for pre-training, resized to `side` px, label)."""
    if not 0 <= index < len(dataset):
        raise ValueError(f'no image {index}: pass an --index in 0..{len(dataset) - 1}')
    if (item := dataset[index]) is None:
        raise ValueError(f'image {index} is unreadable: pass another --index')
    image = data.pretrain_geometry(size)(item[0].convert('RGB'))
    return (image.resize((side, side), Image.NEAREST) if side else image), item[1]  # crisp


# masks: Fig. 2b-c, Fig. 1.
def masks_figure(mask, rows, cols, cell, title, left=86, top=44):
    """A bool matrix, a `cell` px square per entry, in [(name, length)] segments."""
    tiles = torch.tensor([GHOST, ALLOWED], dtype=torch.uint8)[mask.long()].view(-1, 3, 1, 1)
    grid = make_grid(tiles.expand(-1, -1, cell - 1, cell - 1), mask.shape[1], 1, pad_value=255)
    right = max(0, math.ceil(font(13).getlength(title)) - grid.shape[-1])
    img = ImageOps.expand(TF.to_pil_image(grid), (left, top, right, 0), WHITE)
    draw = ImageDraw.Draw(img)
    draw.text((left, 0), title, BLACK, font(13))
    for j, (name, n) in enumerate(cols):  # names alternate in height: short segments stay legible
        x = left + cell * sum(n for _, n in cols[:j])
        draw.line((x, top, x, img.height), BLACK if j else WHITE)
        draw.text((x + n * cell / 2, top - 4 - 14 * (j % 2)), name, BLACK, font(12), anchor='md')
    for i, (name, n) in enumerate(rows):
        y = top + cell * sum(n for _, n in rows[:i])
        draw.line((left, y, left + grid.shape[-1], y), BLACK if i else WHITE)
        draw.text((left - 6, y + n * cell / 2), name, BLACK, font(12), anchor='rm')
    return img


def cmd_masks(args):
    """Fig. 2b-c; Fig. 1 if N is square."""
    N, cut, objective = args.num_patches, args.cut, args.objective
    content, query = model.build_masks(objective, N, cut)
    (M, L), tag, G = query.shape, f'N{N}_cut{cut}', math.isqrt(N)
    cell, tokens = max(3, min(16, 720 // L)), L > 1 + N
    segments = [('CLS', 1), ('visible', cut), ('targets', M)] + [('mask tokens', M)] * tokens
    body = stack([masks_figure(content, segments, segments, cell, f'(b) content stream: {L} x {L}'),
                  masks_figure(query, [('queries', M)], segments, cell,
                               f'(c) query stream: {M} x {L}')], gap=40)
    paths = [save(args.out, f'masks_{objective}_{tag}.png', body, f'{objective} attention masks '
                  f'(Fig. 2b-c): N = {N}, cut = {cut} (paper c = {cut + 1}), M = {M}',
                  'green: row (query) may attend to column (key); grey: may not',
                  'order: CLS | visible | targets in permutation order'
                  + ' | mask token m_t: the position of target t' * tokens)]
    if G * G != N:
        print(f'N = {N} is not square: no Fig. 1 (pass a square --num-patches, e.g. 16)')
        return paths
    dataset = data.build_dataset(args.data, 'train', args.data_root)
    pixels = TF.pil_to_tensor(image_at(dataset, args.index, G * max(8, 96 // G))[0])  # (3, S, S)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(args.seed))
    return paths + [save(args.out, f'masks_views_{tag}.png', *views_figure(pixels, cut, perm))]


def what_targets_see(objective, perm, cut):
    """(M, N) bools, raster order: the patches whose content, and position, target t may use."""
    N, targets = len(perm), perm[cut:]
    M = N - cut
    content, position = torch.zeros(2, M, N, dtype=torch.bool)
    if objective == 'mim':  # Fig. 1a: one corrupted input for all targets
        content[:, perm[:cut]] = True
        position[:, targets] = True
        return content, position
    _, query = model.build_masks(objective, N, cut)  # (M, L), permuted layout
    content[:, perm] = query[:, 1:1 + N]  # column 1 + j: perm[j]
    if objective == 'mapet':
        position[:, targets] = query[:, 1 + N:]  # column 1 + N + r: target r
    position[torch.arange(M), targets] = True  # the query stream starts from its own position
    return content, position


CAPTIONS = {'mim': 'MIM (Fig. 1a)\ncontent: unmasked patches\npositions: all masked',
            'pim': 'PIM (Fig. 1b, Eq. 1)\ncontent: visible + earlier\nposition: its own',
            'mapet': 'MaPeT (Fig. 1c, Eq. 2)\ncontent: visible + earlier\npositions: own + later'}


def views_figure(pixels, cut, perm, max_steps=12, left=170):
    """Fig. 1 on an image (3, S, S)."""
    N, S = len(perm), pixels.shape[-1]
    G, M, targets, panels = math.isqrt(N), N - cut, perm[cut:].tolist(), []
    steps = sorted(set(np.linspace(0, M - 1, min(M, max_steps)).round().astype(int).tolist()))
    visible = torch.zeros(N, dtype=torch.bool).index_fill_(0, perm[:cut], True)
    for objective in CAPTIONS:  # first the content stream's input
        content, position = what_targets_see(objective, perm, cut)
        panels.append(view_panel(pixels, G, visible, targets,
                                 [WHITE if objective == 'pim' else BLUE] * M,
                                 None if objective == 'mim' else [str(r + 1) for r in range(M)]))
        for t in steps:
            known = [n for n in position[t].nonzero()[:, 0].tolist() if n != targets[t]]
            panels.append(view_panel(pixels, G, content[t], known + [targets[t]],
                                     [BLUE] * len(known) + [RED]))
    img = ImageOps.expand(TF.to_pil_image(make_grid(panels, 1 + len(steps), 8, pad_value=255)),
                          (left, 20, 0, 0), WHITE)
    draw = ImageDraw.Draw(img)
    for j, head in enumerate(['input'] + [f't = {t + 1}' for t in steps]):
        draw.text((left + 8 + j * (S + 8) + S / 2, 22), head, BLACK, font(12), anchor='md')
    for i, caption in enumerate(CAPTIONS.values()):
        draw.multiline_text((0, 28 + i * (S + 8)), caption, BLACK, font(12))
    shown = 'every step' if len(steps) == M else f'{len(steps)} of the {M} steps'
    return (img, f'What predicting target t may use: N = {N}, cut = {cut}, M = {M} '
            f'targets ({shown})', 'faded: content hidden; input: the content stream\'s, numbered '
            'in permutation order (mim: all at once)',
            ('blue frame: position known (a mask token)', BLUE),
            ('red frame: target predicted at step t', RED))


# Token files: codebook patches (Fig. 3-5), token names (Sec. 5.3, App. C), token maps.
def open_tokens(token_dir, data_root):
    """(tokens (n, G, G), meta, dataset)."""
    if not os.path.isfile(path := os.path.join(token_dir, 'meta.json')):
        raise ValueError(f'{token_dir} holds no meta.json: pass a tokenizer.py --out dir')
    name, split, grid = map(json.loads(pathlib.Path(path).read_text()).get,
                            ('dataset', 'split', 'grid'))
    dataset = data.build_dataset(name, split, data_root)
    return *data.load_tokens(token_dir, name, split, len(dataset), grid), dataset


def token_counts(tokens, vocab_size, skipped=(), chunk=65536):
    """Patches per token (K,); in chunks, as tokens is a memmap."""
    keep = np.ones(len(tokens), dtype=bool)
    keep[list(skipped)] = False
    return sum(np.bincount(np.asarray(tokens[i:i + chunk])[keep[i:i + chunk]].ravel(),
                           minlength=vocab_size) for i in range(0, len(tokens), chunk))


def find_examples(tokens, ids, per_token, skipped=(), seed=0, sample=50_000):
    """{token: [(image, row, col)]}, from distinct images."""
    order = np.random.default_rng(seed).permutation(len(tokens))
    order = order[~np.isin(order, list(skipped))][:sample]
    G, found = tokens.shape[1], {}
    block = np.asarray(tokens[order]).reshape(len(order), G * G)
    for k in ids:
        images, positions = np.nonzero(block == k)
        _, first = np.unique(images, return_index=True)  # one patch per image
        found[int(k)] = [(int(order[images[i]]), *divmod(int(positions[i]), G))
                         for i in first[:per_token]]
    return found


def cmd_codebook(args):
    """Fig. 3-5: a row of patches per token."""
    tokens, meta, dataset = open_tokens(args.tokens, args.data_root)
    paths, names = ([], None) if args.command == 'codebook' else name_tokens(args, meta)
    skipped, G, size = meta.get('skipped', ()), meta['grid'], meta['image_size']
    counts = token_counts(tokens, meta['vocab_size'], skipped)
    chosen = [int(k) for k in np.argsort(-counts, kind='stable')[:args.top] if counts[k] > 0]
    examples = find_examples(tokens, chosen, args.per_token, skipped, args.seed)
    scale = max(1, math.ceil(48 * G / size))  # demo's 4 px patches: 12x
    q, rows = size // G * scale, []  # px per patch shown
    for k in chosen:
        strip = make_grid([TF.pil_to_tensor(image_at(dataset, i, size, size * scale)[0])[
            :, r * q:r * q + q, c * q:c * q + q] for i, r, c in examples[k]], args.per_token, 2,
            pad_value=255)
        label = ([f'"{names[k][0]}"', f'token {k}, cosine {names[k][1]:.2f}'] if names else
                 [f'token {k}']) + [f'{counts[k]:,} patches, {counts[k] / counts.sum():.1%}']
        rows.append(stack([text(label, width=150), TF.to_pil_image(strip)]))
    stem = 'names' if names else 'codebook_' + os.path.basename(os.path.normpath(args.tokens))
    title = 'Tokens named by CLIP (Sec. 5.3)' if names else 'Patches per token (Fig. 3-5)'
    return paths + [save(args.out, f'{stem}.png', stack(rows, True, 4), title, f'{meta["dataset"]} '
                         f'{meta["split"]}, {G}x{G} tokens of vocabulary {meta["vocab_size"]} '
                         f'({meta["features"]}), the most used; patches from distinct images')]


PROMPT = 'a photo of a {}.'  # CLIP's basic zero-shot prompt


def name_tokens(args, meta):
    """Each k-CLIP centroid c's best prompt (Sec. 4.2): attention pooling, c_proj of a convex mix of
    v_proj(x_i + pos_i), embeds an all-c map as c_proj(v_proj(c)) (MaskCLIP, Zhou et al. 2022)."""
    file = pathlib.Path(args.classes)
    classes = file.read_text().splitlines() if file.is_file() else args.classes.split(',')
    if not (classes := [c.strip() for c in classes if c.strip()]):
        raise ValueError(f'no names in --classes {args.classes!r}: pass dog,cat,car or a file')
    kind, _, clip_name = meta['features'].partition(':')
    if kind != 'clip':
        raise ValueError(f'{args.tokens} is a {kind} codebook: only CLIP-feature codebooks can be '
                         'named (tokenizer.py --features clip)')
    clip = clip_model.load(clip_name := args.clip or clip_name)
    codebook = torch.from_numpy(np.load(os.path.join(args.tokens, 'codebook.npy')))  # (K, C)
    pool = clip.visual.attnpool
    if codebook.shape[1] != pool.v_proj.in_features:
        raise ValueError(f'{args.tokens} holds {codebook.shape[1]}-dim features, not CLIP '
                         f'{clip_name}\'s: pass --clip the tokenizer\'s CLIP model')
    with torch.no_grad():
        image = pool.c_proj(pool.v_proj(codebook.float()))  # (K, E)
        words = clip.encode_text(clip_model.tokenize([PROMPT.format(c) for c in classes],
                                                     clip.config.context_length, truncate=True))
        score, best = (F.normalize(image, dim=-1) @ F.normalize(words, dim=-1).T).max(dim=1)
    names = [(classes[b], s) for b, s in zip(best.tolist(), score.tolist())]
    tokens = {str(k): {'name': n, 'cosine': round(s, 5)} for k, (n, s) in enumerate(names)}
    return [save(args.out, 'names.json', dict(clip=clip_name, prompt=PROMPT, classes=classes,
                                              tokens=tokens))], names


def cmd_tokens(args):
    tokens, meta, dataset = open_tokens(args.tokens, args.data_root)
    G, rows = meta['grid'], []
    for i in args.index:
        image, label = image_at(dataset, i, meta['image_size'], G * TOKEN_CELL)
        image = view_panel(TF.pil_to_tensor(image), G, torch.ones(G * G, dtype=torch.bool),
                           range(G * G), [WHITE] * G * G, width=1)
        rows.append(stack([text([f'image {i}', dataset.classes[label]], width=110),
                           *map(TF.to_pil_image, (image, token_map(np.asarray(tokens[i]))))]))
    name = os.path.basename(os.path.normpath(args.tokens)) + ''.join(f'_{i}' for i in args.index)
    return [save(args.out, f'tokens_{name}.png', stack(rows, True, 12),
                 'Images and their visual tokens', f'{meta["dataset"]} {meta["split"]}, {G}x{G} '
                 f'tokens, vocabulary {meta["vocab_size"]} ({meta["features"]}); a token\'s colour '
                 'follows its id, written in it')]


# curves: pretrain.py's log.jsonl files.
def read_log(path):
    """(steps, 3): step, loss, token accuracy; a step's last line wins, a torn end is skipped."""
    lines = [line for line in pathlib.Path(path).read_text().splitlines() if line.strip()]
    records = {}
    for n, line in enumerate(lines, 1):
        try:
            r = json.loads(line)
            records[r['step']] = (r['step'], r['loss'], r['token_acc'])
        except (ValueError, KeyError, TypeError):
            if n < len(lines):
                raise ValueError(f'{path} line {n} is not a pretrain.py log line: pass a log.jsonl')
    if not records:
        raise ValueError(f'{path} holds no log lines yet: pass a log with lines')
    return np.array([records[s] for s in sorted(records)])


def line_chart(series, title, W=620, H=400, left=64, top=32, bottom=44):
    (x0, x1), (y0, y1) = [(v.min(), v.max() + (v.max() == v.min())) for v in map(
        np.concatenate, zip(*[(x, y) for _, x, y in series]))]

    def at(x, y):  # data -> pixels
        return (left + (x - x0) / (x1 - x0) * (W - left - 18),
                H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom))
    draw = ImageDraw.Draw(img := Image.new('RGB', (W, H), WHITE))
    draw.text((W / 2, 6), title, BLACK, font(14), anchor='ma')
    for x, y in zip(np.linspace(x0, x1, 6).round(), np.linspace(y0, y1, 6)):
        (u, _), (_, v) = at(x, y0), at(x0, y)  # whole steps on x
        draw.line((u, top, u, H - bottom + 4), GHOST)
        draw.text((u, H - bottom + 7), f'{x:,.0f}', BLACK, font(11), anchor='ma')
        draw.line((left - 4, v, W - 18, v), GHOST)
        draw.text((left - 8, v), f'{y:.3g}', BLACK, font(11), anchor='rm')
    draw.line((left, top, left, H - bottom, W - 18, H - bottom), BLACK)
    draw.text(((left + W) / 2, H - 4), 'step', BLACK, font(12), anchor='md')
    for colour, xs, ys in series:
        draw.line([at(x, y) for x, y in zip(xs, ys)], colour, 2, joint='curve')
        x, y = at(xs[-1], ys[-1])
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), colour)
    return img


def cmd_curves(args):
    runs = [read_log(path) for path in args.logs]  # (steps, 3) each
    labels = (args.labels.split(',') if args.labels else
              [os.path.basename(os.path.dirname(os.path.abspath(path))) for path in args.logs])
    if len(labels) != len(runs):
        raise ValueError(f'{len(labels)} --labels for {len(runs)} logs: give one label per log')
    colours = [LINE_COLOURS[i % len(LINE_COLOURS)] for i in range(len(runs))]
    body = stack([line_chart([(c, r[:, 0], r[:, i] * scale) for c, r in zip(colours, runs)], title)
                  for i, scale, title in ((1, 1, 'loss (cross-entropy over the vocabulary)'),
                                          (2, 100, 'token accuracy (%, top-1)'))])
    finals = [(f'{label}: loss {r[-1, 1]:.3f}, token accuracy {r[-1, 2]:.1%}, step {r[-1, 0]:.0f}',
               c) for label, r, c in zip(labels, runs, colours)]
    return [save(args.out, 'curves.png', body, 'Pre-training curves', 'token accuracy: over the '
                 'masked patches (mim, beit, cae) or the targets (pim, mapet)', *finals)]


# predictions: a pre-trained model's tokens for one image's targets (Eq. 1-2).
def load_pretrainer(path):
    ckpt = training.load_checkpoint(path)
    if not {'model', 'config', 'args', 'tokens'} <= set(ckpt):
        raise ValueError(f'{path} is not a pretrain.py ckpt.pt: pass <run>/ckpt.pt')
    a = ckpt['args']
    pre = model.Pretrainer(model.VisionTransformer(**ckpt['config']), a['objective'], cut=a['cut'],
                           vocab_size=ckpt['tokens']['vocab_size'], mask_ratio=a['mask_ratio'])
    try:
        pre.load_state_dict(ckpt['model'])
    except RuntimeError as e:  # e.g. an older model.py's
        raise ValueError(f'{path} does not fit its config: {str(e).splitlines()[0]}')
    return pre.eval(), ckpt


def predict(pre, image, tokens, seed):
    """A dict per target, in prediction order."""
    N, g = pre.num_patches, torch.Generator().manual_seed(seed)
    tokens = torch.as_tensor(tokens).reshape(1, N)
    if pre.two_stream:
        perm = torch.randperm(N, generator=g)[None]  # (1, N)
        kw, order = {'perm': perm}, perm[0, pre.cut:]
    else:
        mask = (model.block_mask(pre.grid, pre.num_masked, generator=g)[None] if pre.objective in
                ('beit', 'cae') else model.random_mask(1, N, pre.num_masked, generator=g))
        kw, order = {'mask': mask}, mask[0].nonzero()[:, 0]
    with torch.no_grad():
        prob = pre(image[None], tokens, **kw)[0][0].softmax(-1)  # (M, K)
    return [dict(step=t + 1, patch=n, true=int(tokens[0, n]), pred=int(p.argmax()),
                 prob=float(p.max())) for t, (n, p) in enumerate(zip(order.tolist(), prob))]


def cmd_predictions(args):
    pre, ckpt = load_pretrainer(args.checkpoint)
    run, G, stem = ckpt['args'], pre.grid, f'predictions_{pre.objective}_{args.index}'
    dataset = data.build_dataset(run['data'], 'train', args.data_root or run['data_root'])
    image = image_at(dataset, args.index, pre.backbone.patch_embed.img_size)[0]
    tokens = data.load_tokens(ckpt['tokens']['dir'], run['data'], 'train', len(dataset), G,
                              ckpt['tokens']['vocab_size'])[0][args.index].astype(np.int64)
    x = TF.normalize(TF.to_tensor(image), data.IMAGENET_MEAN, data.IMAGENET_STD)  # no jitter
    records = predict(pre, x, tokens, args.seed)
    targets, right = [r['patch'] for r in records], [r['true'] == r['pred'] for r in records]
    everywhere = torch.ones(G * G, dtype=torch.bool)
    visible = everywhere.index_fill(0, torch.tensor(targets), False)
    predicted = tokens.copy()
    predicted.flat[targets] = [r['pred'] for r in records]
    photo = TF.pil_to_tensor(image.resize((G * TOKEN_CELL,) * 2, Image.NEAREST))
    panels = [view_panel(photo, G, everywhere, targets, [BLUE] * len(targets),
                         [str(r['step']) for r in records]), token_map(tokens),
              view_panel(token_map(predicted), G, ~visible, targets,
                         [GREEN if ok else RED for ok in right])]
    how = (f'after the first cut = {pre.cut} of the permutation, in its order' if pre.two_stream
           else 'the masked patches, in raster order')
    return [save(args.out, stem + '.json', {'objective': pre.objective, 'targets': records,
                                            'visible': visible.nonzero()[:, 0].tolist()}),
            save(args.out, stem + '.png', TF.to_pil_image(make_grid(panels, 3, 12, pad_value=255)),
                 f'{pre.objective} predictions, image {args.index}: {sum(right)} of {len(right)} '
                 f'targets right', f'{args.checkpoint} (step {ckpt["step"]}); targets: {how}',
                 'left: the image, targets numbered by step; middle: its tokens; right: '
                 'predicted, visible patches faded', ('green frame: right', GREEN),
                 ('red frame: wrong', RED))]


def get_args_parser():
    p = argparse.ArgumentParser('visualize.py', description='Pictures of Fig. 1-5 and of runs.')
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument('--out', default='runs/pictures', help='[runs/pictures]')
    root = argparse.ArgumentParser(add_help=False, parents=[out])
    root.add_argument('--data-root', default='data', help='datasets\' root [data]')
    tok = argparse.ArgumentParser(add_help=False, parents=[root])
    tok.add_argument('--tokens', required=True, help='a tokenizer.py --out dir')
    sub = p.add_subparsers(dest='command', required=True)

    s = sub.add_parser('masks', parents=[root], help='Fig. 2b-c masks; Fig. 1 on an image')
    s.add_argument('--objective', default='mapet', choices=('pim', 'mapet'), help='[mapet]')
    s.add_argument('--num-patches', type=int, default=16, help='N, square: Fig. 1; paper 196 [16]')
    s.add_argument('--cut', type=int, default=5, help='visible patches; paper c - 1 = 59 [5]')
    s.add_argument('--data', default='demo', help='dataset of the Fig. 1 image [demo]')
    s.add_argument('--index', type=int, default=0, help='the Fig. 1 image, train split [0]')
    s.add_argument('--seed', type=int, default=0, help='seeds its permutation [0]')

    for name, top, about in (('codebook', 16, ''), ('names', 12, ', named by CLIP zero-shot')):
        s = sub.add_parser(name, parents=[tok], help=f'Fig. 3-5: patches per token{about}')
        s.add_argument('--top', type=int, default=top, help=f'most used tokens shown [{top}]')
        s.add_argument('--per-token', type=int, default=12, help='[12]')
        s.add_argument('--seed', type=int, default=0, help='seeds the images sampled [0]')
    s.add_argument('--classes', required=True, help='dog,cat,car or a file of names, one a line')
    s.add_argument('--clip', help='CLIP name or file [the tokens\']; paper: RN50x64')

    s = sub.add_parser('tokens', parents=[tok], help='images beside their token maps')
    s.add_argument('--index', type=int, nargs='+', default=[0, 1, 2], help='images, a row each')

    s = sub.add_parser('curves', parents=[out], help='loss and token accuracy of pretrain.py runs')
    s.add_argument('logs', nargs='+', help='log.jsonl files')
    s.add_argument('--labels', help='comma-separated [the run dirs]')

    s = sub.add_parser('predictions', parents=[out], help='predicted vs true tokens of an image')
    s.add_argument('--checkpoint', required=True, help='ckpt.pt of a pretrain.py run')
    s.add_argument('--index', type=int, default=0, help='image of the train split [0]')
    s.add_argument('--seed', type=int, default=0, help='seeds the permutation or mask [0]')
    s.add_argument('--data-root', help='datasets\' root [the run\'s]')
    return p


COMMANDS = {'masks': cmd_masks, 'codebook': cmd_codebook, 'names': cmd_codebook,
            'tokens': cmd_tokens, 'curves': cmd_curves, 'predictions': cmd_predictions}


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    training.print_run(args)
    try:
        if min(getattr(args, 'top', 1), getattr(args, 'per_token', 1)) < 1:
            raise ValueError('--top and --per-token must be at least 1')
        return COMMANDS[args.command](args)
    except (ValueError, OSError) as e:  # one line
        raise SystemExit(f'visualize.py {args.command}: {e}') from None


if __name__ == '__main__':
    main()
