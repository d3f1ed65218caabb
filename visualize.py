"""Pictures of what the other stages compute: masks, codebook patches, token maps, token names,
training curves and a checkpoint's predictions.

Paper: Fig. 1 (what a target may see under MIM, PIM and MaPeT), Fig. 2b-c (the content and query
attention masks of Sec. 4.1), Fig. 3-5 with Sec. 5.3 and Appendix C (image patches grouped by
their k-CLIP token, the tokens named by CLIP), Eq. 1-2 (a pre-trained model predicting its targets
in permutation order) and the pre-training runs behind Tab. 1-2 (loss and token accuracy).

    python visualize.py masks --objective mapet --num-patches 16 --cut 5     # Fig. 2 + Fig. 1 on an image
    python visualize.py codebook --tokens runs/tokens/demo                   # Fig. 3-5: patches per token
    python visualize.py tokens --tokens runs/tokens/demo --index 0 1 2       # images beside their token maps
    python visualize.py names --tokens tokens/in1k_rn50 --clip RN50 --classes-file classes.txt
    python visualize.py curves runs/pretrain_*/log.jsonl                      # loss and token accuracy
    python visualize.py predictions --checkpoint runs/pretrain_mapet/ckpt.pt --index 0

Each command writes PNGs (and, for names and predictions, the numbers as JSON) to --out, default
runs/pictures, and prints their paths. Drawn with PIL and torchvision alone: every grid is made
of whole-pixel cells of a fixed size, so a picture can be read back (the tests do).

Shape letters: N patches, M targets, L content-stream length, K vocabulary, C feature dim,
E CLIP joint-embedding dim, G grid side.
"""
import argparse
import json
import math
import os
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torchvision import transforms
from torchvision.utils import make_grid

import clip_model
import data
import model
import training

# ----------------------------------------------------------------------------------------------
# Drawing: fonts, text, colours, stacking. PIL only; no plotting library is a dependency.

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (110, 110, 110)
ALLOWED, BLOCKED = (40, 160, 70), (226, 226, 226)       # mask cells: may attend / may not
POSITION, TARGET = (25, 95, 230), (230, 50, 20)         # outlines: a known position, the target predicted
RIGHT, WRONG = (30, 150, 50), (215, 30, 30)
LINE_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
NAMES = {'mim': 'MIM', 'beit': 'BEiT', 'pim': 'PIM', 'mapet': 'MaPeT'}


@lru_cache(maxsize=None)
def font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has a single small bitmap font
        return ImageFont.load_default()


def text_width(s, size):
    return math.ceil(font(size).getlength(s))


def line_height(size):
    return font(size).getbbox('Ag')[3] + 1


def put(draw, xy, s, size=12, fill=BLACK, ha='left', va='top'):
    """Text whose line box is aligned to xy: ha left | center | right, va top | middle | bottom."""
    w, h = text_width(s, size), line_height(size)
    x = xy[0] - {'left': 0, 'center': w / 2, 'right': w}[ha]
    y = xy[1] - {'top': 0, 'middle': h / 2, 'bottom': h}[va]
    draw.text((round(x), round(y)), s, font=font(size), fill=fill)


def vertical_text(s, size, fill=BLACK):
    """An RGBA image of `s` reading bottom to top, for column labels."""
    im = Image.new('RGBA', (text_width(s, size) + 2, line_height(size) + 2), (0, 0, 0, 0))
    ImageDraw.Draw(im).text((1, 1), s, font=font(size), fill=fill)
    return im.rotate(90, expand=True)


def text_block(lines, size=12, width=None, pad=4):
    """A white image holding lines of text (a str is one line; (str, size) sets its size)."""
    lines = [(l, size) if isinstance(l, str) else l for l in lines]
    w = width or max(text_width(s, z) for s, z in lines) + 2 * pad
    im = Image.new('RGB', (w, sum(line_height(z) + 2 for _, z in lines) + 2 * pad), WHITE)
    y, draw = pad, ImageDraw.Draw(im)
    for s, z in lines:
        put(draw, (pad, y), s, z)
        y += line_height(z) + 2
    return im


def stack(images, vertical, gap=0):
    """Images one above the other (left-aligned) or side by side (top-aligned), on white."""
    along = [im.height if vertical else im.width for im in images]
    across = [im.width if vertical else im.height for im in images]
    size = (max(across), sum(along) + gap * (len(images) - 1))
    out = Image.new('RGB', size if vertical else size[::-1], WHITE)
    offset = 0
    for im, a in zip(images, along):
        out.paste(im, (0, offset) if vertical else (offset, 0))
        offset += a + gap
    return out


def titled(body, title, lines=(), legend_items=None):
    """A figure: a title (and note lines) above the body, a legend below, with margins."""
    parts = [text_block([(title, 16), *lines])] + [body] + ([legend(legend_items)] if legend_items else [])
    figure = stack(parts, vertical=True, gap=10)
    out = Image.new('RGB', (figure.width + 32, figure.height + 32), WHITE)
    out.paste(figure, (16, 16))
    return out


def legend(items, size=12):
    """One row of (kind, colour, text): kind 'fill' (a square), 'outline' (a framed square), 'line'."""
    x, h = 4, line_height(size) + 8
    im = Image.new('RGB', (sum(34 + text_width(t, size) for _, _, t in items) + 8, h), WHITE)
    draw = ImageDraw.Draw(im)
    for kind, colour, text in items:
        box = (x, 3, x + h - 7, h - 4)
        if kind == 'fill':
            draw.rectangle(box, fill=colour)
        elif kind == 'outline':
            draw.rectangle(box, outline=colour, width=2)
        else:
            draw.line((x, h // 2, x + h - 6, h // 2), fill=colour, width=3)
        put(draw, (x + h, h // 2), text, size, va='middle')
        x += 34 + text_width(text, size)
    return im


def token_colour(k):
    """A fixed colour per token id: an integer hash of it, each channel in 40..255."""
    h = (int(k) * 2654435761) & 0xFFFFFFFF
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    h ^= h >> 16
    return tuple(40 + ((h >> s) & 0xFF) * 215 // 255 for s in (0, 8, 16))


def ink_on(colour):
    """Black or white, whichever reads better on `colour` (by its luma)."""
    return BLACK if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 140 else WHITE


def to_image(t):
    """A float [3, H, W] tensor in [0, 1] -> PIL RGB."""
    return Image.fromarray((t.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def upscale(img, factor):
    """Nearest-neighbour enlargement, so a 4 px demo patch stays a crisp 4x4 block."""
    return img.resize((img.width * factor, img.height * factor), Image.NEAREST)


def save(img, out_dir, name):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    img.save(path)
    print(path)
    return path


# ----------------------------------------------------------------------------------------------
# masks: the attention masks of Fig. 2b-c, and what each target may see (Fig. 1) on an image.


def mask_segments(objective, num_patches, cut):
    """The content stream's layout as [(segment, entry labels)] (model.build_masks' order)."""
    M = num_patches - cut
    segments = [('CLS', ['CLS']), ('visible', [f'v{i + 1}' for i in range(cut)]),
                ('targets', [f't{t + 1}' for t in range(M)])]
    if objective == 'mapet':
        segments.append(('mask tokens', [f'm{t + 1}' for t in range(M)]))  # m_t: target t's position
    return segments


def mask_matrix(mask, rows, cols, cell, title):
    """A boolean matrix drawn one cell x cell square per entry (green = may attend), rows and
    columns labelled by segment (and by entry when cells are large enough), segments separated."""
    R, C = mask.shape
    entries = cell >= 10                                     # room for a label per row / column
    size = min(12, max(8, cell - 3))
    row_seg_w = max(text_width(s, 12) for s, _ in rows) + 10
    row_ent_w = max(text_width(e, size) for _, es in rows for e in es) + 6 if entries else 0
    col_seg_h = max(text_width(s, 12) for s, _ in cols) + 8
    col_ent_h = max(text_width(e, size) for _, es in cols for e in es) + 6 if entries else 0
    title_h = line_height(13) + 8
    x0, y0 = row_seg_w + row_ent_w, title_h + col_seg_h + col_ent_h
    title_x = max(0, round(x0 + C * cell / 2 - text_width(title, 13) / 2))     # centred over the cells
    img = Image.new('RGB', (max(x0 + C * cell, title_x + text_width(title, 13)) + 4, y0 + R * cell + 4), WHITE)
    cells = np.where(np.asarray(mask)[..., None], ALLOWED, BLOCKED).astype(np.uint8)        # (R, C, 3)
    img.paste(Image.fromarray(cells.repeat(cell, 0).repeat(cell, 1)), (x0, y0))
    draw = ImageDraw.Draw(img)
    put(draw, (title_x, 2), title, 13)
    if cell >= 6:  # a faint grid on each cell's last pixel row / column, so cells can be counted
        for i in range(1, C):
            draw.line((x0 + i * cell - 1, y0, x0 + i * cell - 1, y0 + R * cell - 1), fill=WHITE)
        for i in range(1, R):
            draw.line((x0, y0 + i * cell - 1, x0 + C * cell - 1, y0 + i * cell - 1), fill=WHITE)
    draw.rectangle((x0 - 1, y0 - 1, x0 + C * cell, y0 + R * cell), outline=BLACK)
    start = 0
    for name, labels in cols:
        mid = x0 + (start + len(labels) / 2) * cell
        label = vertical_text(name, 12)
        img.paste(label, (round(mid - label.width / 2), title_h + col_seg_h - label.height - 4), label)
        for j, e in enumerate(labels if entries and name != 'CLS' else []):
            label = vertical_text(e, size, GREY)
            img.paste(label, (round(x0 + (start + j + 0.5) * cell - label.width / 2), y0 - label.height - 3), label)
        start += len(labels)
        if start < C:  # segment separator: a dark 2 px line on the boundary between two segments
            draw.line((x0 + start * cell - 1, y0 - 2, x0 + start * cell - 1, y0 + R * cell), fill=BLACK, width=2)
    start = 0
    for name, labels in rows:
        put(draw, (4, y0 + (start + len(labels) / 2) * cell), name, 12, va='middle')
        for i, e in enumerate(labels if entries and name != 'CLS' else []):
            put(draw, (x0 - 4, y0 + (start + i + 0.5) * cell), e, size, GREY, ha='right', va='middle')
        start += len(labels)
        if start < R:
            draw.line((x0 - 2, y0 + start * cell - 1, x0 + C * cell, y0 + start * cell - 1), fill=BLACK, width=2)
    return img


def masks_figure(objective, num_patches, cut, cell):
    """Fig. 2b-c: the content mask (L, L) beside the query mask (M, L) of model.build_masks."""
    content, query = model.build_masks(objective, num_patches, cut)
    M, L = query.shape
    segments = mask_segments(objective, num_patches, cut)
    queries = [('query of target', [f't{t + 1}' for t in range(M)])]
    body = stack([mask_matrix(content, segments, segments, cell, f'(b) content stream: {L} x {L}'),
                  mask_matrix(query, queries, segments, cell, f'(c) query stream: {M} x {L}')], vertical=False, gap=40)
    return titled(body, f'{NAMES[objective]} attention masks (Fig. 2b-c): N = {num_patches} patches, cut = {cut} '
                  f'visible (paper c = {cut + 1}), M = {M} targets', [
                      'Rows attend to columns (row = query, column = key). Order: CLS | visible v | targets t by '
                      'permutation rank' + (' | mask token m_t = position of target t' if objective == 'mapet'
                                            else '')],
                  [('fill', ALLOWED, 'may attend (True)'), ('fill', BLOCKED, 'blocked (False)'),
                   ('line', BLACK, 'segment boundary')])


def what_targets_see(objective, perm, cut):
    """For each target step t, the patches (raster order) whose content, and those whose position
    (a mask token or its own query input), the prediction of target t may use: two (M, N) bools.

    mim masks the same M patches the permutation makes targets, so the three compare on one input.
    pim / mapet read the query rows of model.build_masks, whose columns are in permuted order.
    """
    N = len(perm)
    M, targets = N - cut, perm[cut:]
    content = torch.zeros(M, N, dtype=torch.bool)
    position = torch.zeros(M, N, dtype=torch.bool)
    if objective == 'mim':  # Fig. 1a: one corrupted input, every mask token in it, for all targets alike
        content[:, perm[:cut]] = True
        position[:, targets] = True
        return content, position
    _, query = model.build_masks(objective, N, cut)                          # (M, L), permuted layout
    content[:, perm] = query[:, 1:1 + N]                                     # column 1 + j is patch perm[j]
    if objective == 'mapet':
        position[:, targets] = query[:, 1 + N:]                              # column 1 + N + r: target r's mask token
    position[torch.arange(M), targets] = True  # the query stream starts from its own position (Eq. 1-2)
    return content, position


def view_panel(pixels, grid, content, position=None, target=None, numbers=None):
    """The image (uint8 [S, S, 3], S = grid * p) with patches whose content is unseen faded,
    known positions outlined in blue, the target in red, and optional numbers in the cells."""
    p = pixels.shape[0] // grid
    grey = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    faded = np.repeat((grey * 0.12 + 232 * 0.88)[..., None], 3, -1).astype(np.uint8)   # a pale grey ghost
    seen = np.asarray(content).reshape(grid, grid).repeat(p, 0).repeat(p, 1)[..., None]
    img = Image.fromarray(np.where(seen, pixels, faded))
    draw = ImageDraw.Draw(img)
    for n in range(grid * grid):
        r, c = divmod(n, grid)
        box = (c * p, r * p, (c + 1) * p - 1, (r + 1) * p - 1)
        if n == target:
            draw.rectangle(box, outline=TARGET, width=max(2, p // 8))
        elif position is not None and position[n]:
            draw.rectangle(box, outline=POSITION, width=max(1, p // 12))
        if numbers and n in numbers and p >= 14:  # smaller cells have no room for a number
            put(draw, ((c + 0.5) * p, (r + 0.5) * p), numbers[n], max(8, min(14, p // 2)), (70, 70, 70),
                ha='center', va='middle')
    return img


def views_figure(image, num_patches, cut, perm, max_steps):
    """Fig. 1 on one image: per objective (rows) and target step (columns), what target t sees."""
    G = math.isqrt(num_patches)
    p = max(8, 96 // G)
    pixels = np.asarray(data.pretrain_geometry(G * p)(image.convert('RGB')))          # (G*p, G*p, 3)
    M = num_patches - cut
    steps = sorted(set(np.linspace(0, M - 1, min(M, max_steps)).round().astype(int).tolist()))
    visible = torch.zeros(num_patches, dtype=torch.bool)
    visible[perm[:cut]] = True
    order = {int(n): str(t + 1) for t, n in enumerate(perm[cut:])}
    captions = {'mim': ['MIM (Fig. 1a)', 'content: unmasked patches', 'positions: all masked ones,',
                        'every step alike'],
                'pim': ['PIM (Fig. 1b, Eq. 1)', 'content: visible + earlier', 'targets', 'positions: its own only'],
                'mapet': ['MaPeT (Fig. 1c, Eq. 2)', 'content: visible + earlier', 'targets',
                          'positions: its own + later', 'targets']}
    label_w = max(text_width(s, 12) for c in captions.values() for s in c) + 12
    header = [text_block([''], width=label_w)]
    header += [text_block([f't = {t + 1}' if t >= 0 else 'input'], width=G * p) for t in [-1, *steps]]
    rows = [stack(header, vertical=False, gap=8)]
    for objective in ('mim', 'pim', 'mapet'):
        content, position = what_targets_see(objective, perm, cut)
        # The content stream's input: pim has no mask tokens in it, mim and mapet have one per target.
        first = view_panel(pixels, G, visible, None if objective == 'pim' else ~visible,
                           numbers=None if objective == 'mim' else order)
        panels = [view_panel(pixels, G, content[t], position[t], int(perm[cut + t])) for t in steps]
        label = text_block([(captions[objective][0], 13), *captions[objective][1:]], width=label_w)
        rows.append(stack([label, first, *panels], vertical=False, gap=8))
    shown = 'every step' if len(steps) == M else f'{len(steps)} of the {M} steps'
    return titled(stack(rows, vertical=True, gap=10), f'What the prediction of target t may use: N = {num_patches}, '
                  f'cut = {cut}, M = {M} targets ({shown})', [
                      'input: the content stream\'s input (visible patches, mask tokens outlined); numbers = the '
                      'targets\' permutation order; mim masks the same targets and predicts them all at once'],
                  [('fill', (200, 120, 60), 'patch content visible'), ('fill', (226, 226, 226), 'content hidden'),
                   ('outline', POSITION, 'position known (mask token)'),
                   ('outline', TARGET, 'the target predicted at step t')])


def cmd_masks(args):
    L = 1 + args.num_patches + (args.num_patches - args.cut if args.objective == 'mapet' else 0)
    cell = args.cell or min(16, max(2, 720 // L))                    # ~720 px for the content mask
    matrices = masks_figure(args.objective, args.num_patches, args.cut, cell)   # build_masks checks cut
    tag = f'N{args.num_patches}_cut{args.cut}'
    paths = [save(matrices, args.out, f'masks_{args.objective}_{tag}.png')]
    G = math.isqrt(args.num_patches)
    if G * G != args.num_patches:
        print(f'N = {args.num_patches} is not a square grid: no image panels (pick a square N such as 16 or 64)')
        return paths
    image, _ = pick_image(data.build_dataset(args.data, 'train', args.data_root), args.index, f'{args.data} train')
    perm = torch.randperm(args.num_patches, generator=torch.Generator().manual_seed(args.seed))
    views = views_figure(image, args.num_patches, args.cut, perm, args.max_steps)
    return paths + [save(views, args.out, f'masks_views_{tag}.png')]


# ----------------------------------------------------------------------------------------------
# Token files: codebook patches (Fig. 3-5), token maps, token names (Sec. 5.3, Appendix C).


def pick_image(dataset, index, what):
    """(PIL RGB image, label) `index` of a dataset, with a clear error for a bad index or file."""
    if not 0 <= index < len(dataset):
        raise ValueError(f'image index {index} is outside 0..{len(dataset) - 1} of {what}')
    item = dataset[index]
    if item is None:
        raise ValueError(f'image {index} of {what} is unreadable')
    return item[0].convert('RGB'), item[1]


def open_tokens(token_dir, data_root):
    """(tokens uint16 [n, G, G], meta, dataset without transform) of a tokenizer.py output dir."""
    path = os.path.join(token_dir, 'meta.json')
    if not os.path.isfile(path):
        raise ValueError(f'{token_dir} holds no meta.json: pass the --out dir of tokenizer.py')
    with open(path) as f:
        meta = json.load(f)
    dataset = data.build_dataset(meta['dataset'], meta['split'], data_root)
    tokens, meta = data.load_tokens(token_dir, meta['dataset'], meta['split'], len(dataset), meta['grid'])
    return tokens, meta, dataset


def patch_size(meta):
    """Side in pixels of one token's square, at the geometry the tokenizer cut the images with."""
    return meta['image_size'] // meta['grid']


def cut_patch(dataset, meta, index, row, col):
    """Patch (row, col) of image `index`, cut at the tokenizer's geometry (data.pretrain_geometry)."""
    p = patch_size(meta)
    image = data.pretrain_geometry(meta['image_size'])(dataset[index][0].convert('RGB'))
    return image.crop((col * p, row * p, (col + 1) * p, (row + 1) * p))


def token_counts(tokens, vocab_size, skipped=(), chunk=65536):
    """How many patches each token labels, [K] int64, rows of unreadable images left out."""
    keep = np.ones(len(tokens), dtype=bool)
    keep[list(skipped)] = False
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), chunk):
        block = np.asarray(tokens[start:start + chunk])[keep[start:start + chunk]]
        counts += np.bincount(block.ravel(), minlength=vocab_size)
    return counts


def find_examples(tokens, ids, per_token, skipped=(), seed=0, chunk=4096):
    """{token: [(image, row, col), ...]}: up to per_token patches labelled with each token, from
    distinct images visited in a seeded random order (not all from the first images)."""
    n, G, _ = tokens.shape
    order = np.random.default_rng(seed).permutation(n)
    order = order[~np.isin(order, list(skipped))]
    found = {int(k): [] for k in ids}
    for start in range(0, len(order), chunk):
        index = order[start:start + chunk]
        block = np.asarray(tokens[index]).reshape(len(index), G * G)
        for k, hits in found.items():
            if len(hits) < per_token:
                images, positions = np.nonzero(block == k)
                _, first = np.unique(images, return_index=True)          # one patch per image
                for i in first[:per_token - len(hits)]:
                    hits.append((int(index[images[i]]), *divmod(int(positions[i]), G)))
        if all(len(hits) == per_token for hits in found.values()):
            break
    return found


def choose_tokens(ids, top, counts):
    """--ids as given, or the `top` most used tokens."""
    if ids:
        try:
            chosen = [int(s) for s in ids.split(',')]
        except ValueError:
            raise ValueError(f'--ids {ids!r} is not a comma-separated list of token ids, e.g. 3,17,42') from None
        if bad := [k for k in chosen if not 0 <= k < len(counts)]:
            raise ValueError(f'token ids {bad} are outside the vocabulary 0..{len(counts) - 1}')
        return chosen
    return [int(k) for k in np.argsort(-counts, kind='stable')[:top] if counts[k] > 0]


def codebook_figure(token_dir, tokens, meta, dataset, ids, top, per_token, seed, names=None):
    """Fig. 3-5: a row per token (id, count, name if given) of image patches labelled with it.
    For a pixels codebook the first cell is the centroid itself, de-normalised: the mean patch."""
    counts = token_counts(tokens, meta['vocab_size'], meta.get('skipped', ()))
    chosen = choose_tokens(ids, top, counts)
    examples = find_examples(tokens, chosen, per_token, meta.get('skipped', ()), seed)
    p = patch_size(meta)
    scale = max(1, math.ceil(48 / p))                                  # demo patches are 4 px: show 12x
    centroids = None
    if meta['features'] == 'pixels':
        codebook = torch.from_numpy(np.load(os.path.join(token_dir, 'codebook.npy')))
        mean, std = torch.tensor(data.IMAGENET_MEAN)[:, None, None], torch.tensor(data.IMAGENET_STD)[:, None, None]
        centroids = (codebook.view(-1, 3, p, p) * std + mean).clamp(0, 1)    # (K, 3, p, p), the ViT's normalisation
    to_tensor = transforms.ToTensor()
    label_w = 200 if names else 150
    rows = []
    for k in chosen:
        cells = [to_tensor(upscale(cut_patch(dataset, meta, *hit), scale)) for hit in examples[k]]
        cells += [torch.ones(3, p * scale, p * scale)] * (per_token - len(cells))   # a rare token: blanks
        strip = [to_image(make_grid(torch.stack(cells), nrow=per_token, padding=2, pad_value=1.0))]
        if centroids is not None:
            strip.insert(0, to_image(make_grid(F.interpolate(centroids[k][None], scale_factor=scale), padding=2)))
        share = f'{counts[k]:,} patches ({counts[k] / max(1, counts.sum()):.1%})'
        lines = ([(f'"{names[k][0]}"', 14), f'token {k}, cosine {names[k][1]:.2f}', share] if names
                 else [(f'token {k}', 13), share])
        rows.append(stack([text_block(lines, width=label_w), *strip], vertical=False, gap=10))
    if not rows:
        raise ValueError(f'{token_dir}: no token labels any patch')
    what = 'top tokens by count' if not ids else 'chosen tokens'
    note = [f'{meta["dataset"]} {meta["split"]}: {meta["num_images"]:,} images, {meta["grid"]}x{meta["grid"]} tokens '
            f'of {p} px at {meta["image_size"]} px, vocabulary {meta["vocab_size"]} ({meta["features"]}); '
            f'{what}, up to {per_token} patches each from distinct images (seed {seed}), shown {scale}x'
            + ('; first cell: the centroid' if centroids is not None else '')]
    title = ('Codebook tokens named by CLIP (Sec. 5.3, Fig. 3-5)' if names else
             'Image patches per visual token (Fig. 3-5)')
    return titled(stack(rows, vertical=True, gap=4), title, note)


def cmd_codebook(args):
    tokens, meta, dataset = open_tokens(args.tokens, args.data_root)
    img = codebook_figure(args.tokens, tokens, meta, dataset, args.ids, args.top, args.per_token, args.seed)
    return [save(img, args.out, f'codebook_{os.path.basename(os.path.normpath(args.tokens))}.png')]


TOKEN_CELL = 32  # px per token in a token map: room for a 4-digit id


def token_map(grid_tokens):
    """A G x G token grid as G*32 px square: one hashed colour per token id, the id written in it."""
    G = grid_tokens.shape[0]
    colours = np.array([token_colour(k) for k in grid_tokens.ravel()], dtype=np.uint8).reshape(G, G, 3)
    img = Image.fromarray(colours.repeat(TOKEN_CELL, 0).repeat(TOKEN_CELL, 1))
    draw = ImageDraw.Draw(img)
    for (r, c), k in np.ndenumerate(grid_tokens):
        put(draw, ((c + 0.5) * TOKEN_CELL, (r + 0.5) * TOKEN_CELL), str(k), 11 if k < 1000 else 9,
            ink_on(tuple(colours[r, c])), ha='center', va='middle')
    return img


def tokens_figure(token_dir, data_root, indices):
    """Each image (at the tokenizer's crop, with its patch grid drawn) beside its token map."""
    tokens, meta, dataset = open_tokens(token_dir, data_root)
    G = meta['grid']
    rows = []
    for i in indices:
        if i in meta.get('skipped', ()):
            raise ValueError(f'image {i} was unreadable when {token_dir} was made: it has no tokens')
        image, label = pick_image(dataset, i, f'{meta["dataset"]} {meta["split"]}')
        image = data.pretrain_geometry(meta['image_size'])(image)
        size = G * TOKEN_CELL
        image = image.resize((size, size), Image.NEAREST if image.width < size else Image.BICUBIC)
        draw = ImageDraw.Draw(image)
        for j in range(1, G):  # the patch grid, to match cells across
            draw.line((j * TOKEN_CELL, 0, j * TOKEN_CELL, size), fill=(255, 255, 255))
            draw.line((0, j * TOKEN_CELL, size, j * TOKEN_CELL), fill=(255, 255, 255))
        rows.append(stack([text_block([(f'image {i}', 13), dataset.classes[label]], width=110), image,
                           token_map(np.asarray(tokens[i]))], vertical=False, gap=12))
    return titled(stack(rows, vertical=True, gap=12), 'Images and their visual tokens', [
        f'{meta["dataset"]} {meta["split"]}, {G}x{G} tokens of vocabulary {meta["vocab_size"]} ({meta["features"]}); '
        'one colour per token id (a fixed hash), the id written in its cell'])


def cmd_tokens(args):
    img = tokens_figure(args.tokens, args.data_root, args.index)
    name = os.path.basename(os.path.normpath(args.tokens))
    return [save(img, args.out, f'tokens_{name}_{"_".join(map(str, args.index))}.png')]


def centroid_embeddings(clip, codebook):
    """k-CLIP centroids [K, C] (layer4 features, Sec. 4.2) -> CLIP's joint space [K, E].

    The attention pool ends in c_proj(softmax-weighted sum over positions of v_proj(x_i + pos_i)),
    per head, the weights summing to 1: an affine map of a convex combination of the values. An
    image whose every layer4 feature were the centroid c would therefore embed to c_proj(v_proj(c))
    whatever the attention weights, leaving out the positional embeddings (as MaskCLIP, Zhou et al.
    ECCV 2022, does for dense labels). That is the embedding we compare with the text prompts.
    """
    pool = clip.visual.attnpool
    return pool.c_proj(pool.v_proj(codebook))


PROMPT = 'a photo of a {}.'  # CLIP's basic zero-shot prompt


def name_tokens(clip, codebook, classes, prompt=PROMPT):
    """Zero-shot name of every token: (class index [K], cosine similarity [K]) of the best prompt."""
    with torch.no_grad():
        image = centroid_embeddings(clip, codebook.float())                              # (K, E)
        texts = clip_model.tokenize([prompt.format(c) for c in classes], clip.config.context_length, truncate=True)
        text = clip.encode_text(texts)                                                   # (classes, E)
        cosine = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T                # (K, classes)
    score, best = cosine.max(dim=1)
    return best, score


def read_classes(classes, classes_file):
    if classes and classes_file:
        raise ValueError('pass --classes or --classes-file, not both')
    if classes_file:
        with open(classes_file) as f:
            names = [line.strip() for line in f if line.strip()]
    elif classes:
        names = [c.strip() for c in classes.split(',') if c.strip()]
    else:
        raise ValueError('name the classes to match: --classes dog,cat,car or --classes-file FILE (one per line)')
    if not names:
        raise ValueError('the class list is empty')
    return names


def cmd_names(args):
    classes = read_classes(args.classes, args.classes_file)
    tokens, meta, dataset = open_tokens(args.tokens, args.data_root)
    kind, _, clip_name = meta['features'].partition(':')
    if kind != 'clip':
        raise ValueError(f'{args.tokens} is a {meta["features"]} codebook: only CLIP-feature codebooks (k-CLIP, '
                         f'tokenizer.py --features clip) live in a space CLIP text can be matched in')
    clip_name = args.clip or clip_name
    clip = clip_model.load(clip_name)  # offline and not cached: a one-line SystemExit
    codebook = torch.from_numpy(np.load(os.path.join(args.tokens, 'codebook.npy')))      # (K, C)
    width = clip.visual.attnpool.v_proj.in_features
    if codebook.shape[1] != width:
        raise ValueError(f'{args.tokens} holds {codebook.shape[1]}-dim features ({meta["features"]}), CLIP '
                         f'{clip_name} has {width}: pass --clip the CLIP model the tokenizer used')
    best, score = name_tokens(clip, codebook, classes)
    counts = token_counts(tokens, len(codebook), meta.get('skipped', ()))
    names = {k: (classes[b], float(s)) for k, (b, s) in enumerate(zip(best.tolist(), score.tolist()))}
    mapping = dict(clip=clip_name, prompt=PROMPT, classes=classes, tokens={
        str(k): dict(name=n, cosine=round(s, 5), count=int(counts[k])) for k, (n, s) in names.items()})
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, 'names.json')
    with open(json_path, 'w') as f:
        json.dump(mapping, f, indent=1)
    print(json_path)
    for k in np.argsort(-counts, kind='stable')[:10]:
        print(f'  token {k:5d} ({counts[k]:,} patches): {names[k][0]} (cosine {names[k][1]:.3f})')
    img = codebook_figure(args.tokens, tokens, meta, dataset, args.ids, args.top, args.per_token, args.seed, names)
    return [json_path, save(img, args.out, 'names.png')]


# ----------------------------------------------------------------------------------------------
# curves: loss and token accuracy against step, from pretrain.py's log.jsonl files.


def read_log(path):
    """[(step, loss, token accuracy)] sorted by step. A resumed run logs again the steps after its
    last checkpoint: the later line wins. A torn last line (a killed run) is ignored."""
    if not os.path.isfile(path):
        raise ValueError(f'no log file {path}: pass the log.jsonl of a pretrain.py run')
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = {}
    for n, line in enumerate(lines, 1):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break
            raise ValueError(f'{path} line {n} is not JSON: pass a log.jsonl written by pretrain.py') from None
        if not {'step', 'loss', 'token_acc'} <= set(r):
            raise ValueError(f'{path} line {n} lacks step, loss or token_acc: is it a pretrain.py log?')
        records[r['step']] = (r['step'], r['loss'], r['token_acc'])
    if not records:
        raise ValueError(f'{path} holds no log lines yet')
    return [records[s] for s in sorted(records)]


def run_label(path):
    """The run's directory name, plus its objective from args.json when the name does not say it."""
    folder = os.path.dirname(os.path.abspath(path))
    name, args_path = os.path.basename(folder), os.path.join(folder, 'args.json')
    if os.path.isfile(args_path):
        with open(args_path) as f:
            objective = json.load(f).get('args', {}).get('objective')
        if objective and objective not in name:
            name += f' ({objective})'
    return name


def nice_ticks(lo, hi, target=5):
    """Round tick values (steps of 1, 2 or 5 times a power of ten) spanning [lo, hi]."""
    if not hi > lo:
        pad = abs(lo) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / target
    power = 10 ** math.floor(math.log10(raw))
    step = min(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))
    ticks = [i * step for i in range(math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9) + 1)]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return ticks, [f'{t:,.{decimals}f}' for t in ticks]


def line_chart(series, title, ylabel, size=(620, 400)):
    """One panel: [(colour, xs, ys)] as lines on axes with ticks, tick labels and axis labels."""
    W, H = size
    left, right, top, bottom = 74, 18, 34, 50
    xs = [x for _, sx, _ in series for x in sx]
    ys = [y for _, _, sy in series for y in sy]
    xt, xl = nice_ticks(min(xs), max(xs))
    yt, yl = nice_ticks(min(ys), max(ys))
    px = lambda x: left + (x - xt[0]) / (xt[-1] - xt[0]) * (W - left - right)
    py = lambda y: H - bottom - (y - yt[0]) / (yt[-1] - yt[0]) * (H - top - bottom)
    img = Image.new('RGB', size, WHITE)
    draw = ImageDraw.Draw(img)
    put(draw, (W / 2, 6), title, 14, ha='center')
    for t, s in zip(xt, xl):
        draw.line((px(t), top, px(t), H - bottom), fill=(232, 232, 232))
        draw.line((px(t), H - bottom, px(t), H - bottom + 5), fill=BLACK)
        put(draw, (px(t), H - bottom + 7), s, 11, ha='center')
    for t, s in zip(yt, yl):
        draw.line((left, py(t), W - right, py(t)), fill=(232, 232, 232))
        draw.line((left - 5, py(t), left, py(t)), fill=BLACK)
        put(draw, (left - 8, py(t)), s, 11, ha='right', va='middle')
    draw.line((left, top, left, H - bottom, W - right, H - bottom), fill=BLACK)
    put(draw, ((left + W - right) / 2, H - 6), 'step', 12, ha='center', va='bottom')
    label = vertical_text(ylabel, 12)
    img.paste(label, (4, round((top + H - bottom - label.height) / 2)), label)
    for colour, sx, sy in series:
        points = [(px(x), py(y)) for x, y in zip(sx, sy)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2, joint='curve')
        for x, y in points[-1:]:  # a dot on the last point (the only one of a one-line log)
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    return img


def curves_figure(logs, labels=None):
    """Two panels, loss and token accuracy against step, one coloured line per run."""
    runs = [read_log(path) for path in logs]
    labels = labels or [run_label(path) for path in logs]
    if len(labels) != len(logs):
        raise ValueError(f'{len(labels)} --labels for {len(logs)} logs: give one label per log')
    colours = [LINE_COLOURS[i % len(LINE_COLOURS)] for i in range(len(runs))]
    loss = [(c, [r[0] for r in run], [r[1] for r in run]) for c, run in zip(colours, runs)]
    acc = [(c, [r[0] for r in run], [100 * r[2] for r in run]) for c, run in zip(colours, runs)]
    body = stack([line_chart(loss, 'pre-training loss (cross-entropy over the vocabulary)', 'loss'),
                  line_chart(acc, 'token accuracy (top-1 on the targets)', 'accuracy (%)')], vertical=False, gap=16)
    finals = [f'{l}: loss {run[-1][1]:.3f}, token accuracy {run[-1][2]:.1%} at step {run[-1][0]:,}'
              for l, run in zip(labels, runs)]
    return titled(body, 'Pre-training curves', [*finals, 'mim/beit score their masked patches, pim/mapet their '
                                                'M = N - cut targets: the accuracies of different objectives are '
                                                'on different target sets'],
                  [('line', c, l) for c, l in zip(colours, labels)])


def cmd_curves(args):
    labels = args.labels.split(',') if args.labels else None
    return [save(curves_figure(args.logs, labels), args.out, 'curves.png')]


# ----------------------------------------------------------------------------------------------
# predictions: a pre-trained model predicting the tokens of one image's targets (Eq. 1-2).


def load_pretrainer(path):
    """The Pretrainer (eval mode) and the checkpoint dict of a pretrain.py ckpt.pt."""
    ckpt = training.load_checkpoint(path)
    if not {'model', 'config', 'args', 'tokens'} <= set(ckpt):
        raise ValueError(f'{path} is not a pretrain.py ckpt.pt (a backbone.pt has no token classifier): '
                         'pass <run>/ckpt.pt')
    args = ckpt['args']
    backbone = model.VisionTransformer(**ckpt['config'])
    pre = model.Pretrainer(backbone, args['objective'], vocab_size=ckpt['tokens']['vocab_size'], cut=args['cut'],
                           mask_ratio=args['mask_ratio'])
    try:
        pre.load_state_dict(ckpt['model'])
    except RuntimeError as e:
        raise ValueError(f'{path} does not match the model its config describes: {str(e).splitlines()[0]}') from None
    return pre.eval(), ckpt


def predict(pre, image, tokens, seed):
    """Predict one image's targets: [dict(step, patch, true, pred, prob)] in prediction order (the
    permutation's for pim/mapet, raster order of the masked patches for mim/beit), and the
    visible-patch mask (N,). The permutation / mask is drawn from `seed`."""
    N, g = pre.num_patches, torch.Generator().manual_seed(seed)
    tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).reshape(1, N)
    if pre.two_stream:
        perm = torch.randperm(N, generator=g)[None]                                     # (1, N)
        kw, order = dict(perm=perm), perm[0, pre.cut:]
    else:
        mask = (model.block_mask(pre.grid, pre.num_masked, generator=g)[None] if pre.objective == 'beit'
                else model.random_mask(1, N, pre.num_masked, generator=g))             # (1, N)
        kw, order = dict(mask=mask), mask[0].nonzero()[:, 0]
    with torch.no_grad():
        logits, _ = pre(image[None], tokens, **kw)                                      # (1, M, K)
    prob = logits[0].softmax(-1)
    visible = torch.ones(N, dtype=torch.bool)
    visible[order] = False
    records = [dict(step=t + 1, patch=int(n), true=int(tokens[0, n]), pred=int(prob[t].argmax()),
                    prob=float(prob[t].max())) for t, n in enumerate(order.tolist())]
    return records, visible


def predictions_figure(pre, ckpt, path, pixels, records, visible, index, per_row):
    """The image (visible patches, targets numbered) above strips with, per target step: its patch,
    the true and the predicted token (colour and id), a tick or a cross, the predicted probability."""
    G = pre.grid
    p = pixels.shape[0] // G
    scale = max(1, math.ceil(48 / p))
    big = np.asarray(upscale(Image.fromarray(pixels), scale))
    s = p * scale                                                 # shown patch side
    cw, sw = s + 8, 24                                            # column width, token swatch height
    rows_y = dict(step=2, patch=20, true=24 + s, pred=52 + s, mark=80 + s, prob=102 + s)
    height = rows_y['prob'] + 16
    columns = []
    for r in records:
        col = Image.new('RGB', (cw, height), WHITE)
        draw = ImageDraw.Draw(col)
        put(draw, (cw / 2, rows_y['step']), f't={r["step"]}', 11, ha='center')
        row, c = divmod(r['patch'], G)
        col.paste(Image.fromarray(big[row * s:(row + 1) * s, c * s:(c + 1) * s]), (4, rows_y['patch']))
        for key in ('true', 'pred'):
            colour, y = token_colour(r[key]), rows_y[key]
            draw.rectangle((4, y, cw - 5, y + sw - 1), fill=colour)
            put(draw, (cw / 2, y + sw / 2), str(r[key]), 11, ink_on(colour), ha='center', va='middle')
        x, y = cw / 2, rows_y['mark']
        if r['true'] == r['pred']:  # drawn: the default font has no tick or cross glyph
            draw.line([(x - 8, y + 9), (x - 2, y + 16), (x + 9, y + 2)], fill=RIGHT, width=3)
        else:
            draw.line((x - 7, y + 2, x + 7, y + 16), fill=WRONG, width=3)
            draw.line((x - 7, y + 16, x + 7, y + 2), fill=WRONG, width=3)
        put(draw, (x, rows_y['prob']), f'{r["prob"]:.2f}', 10, GREY, ha='center')
        columns.append(col)
    heads = Image.new('RGB', (80, height), WHITE)
    draw = ImageDraw.Draw(heads)
    for key, text, dy in (('step', 'step', 0), ('patch', 'patch', s / 2), ('true', 'true', sw / 2),
                          ('pred', 'predicted', sw / 2), ('mark', 'correct?', 9), ('prob', 'p(pred)', 6)):
        put(draw, (76, rows_y[key] + dy), text, 11, ha='right', va='middle' if dy else 'top')
    strips = [stack([heads, *columns[i:i + per_row]], vertical=False, gap=2) for i in range(0, len(columns), per_row)]
    order = {r['patch']: str(r['step']) for r in records}
    context = view_panel(big, G, visible, numbers=order if pre.two_stream else None)
    correct = sum(r['true'] == r['pred'] for r in records)
    how = (f'the patches after the first cut = {pre.cut} of the permutation, in its order' if pre.two_stream
           else 'the masked patches, in raster order')
    return titled(stack([context, *strips], vertical=True, gap=14),
                  f'{NAMES[pre.objective]} predictions for image {index}: {correct}/{len(records)} targets correct '
                  f'({correct / max(1, len(records)):.0%})', [
                      f'{path} (step {ckpt["step"]}), {ckpt["args"]["data"]} train; {len(records)} targets: {how}',
                      'top: the visible patches' + (', the targets numbered by step' if pre.two_stream else '')
                      + '; a token\'s colour is a fixed hash of its id'])


def cmd_predictions(args):
    pre, ckpt = load_pretrainer(args.checkpoint)
    run = ckpt['args']
    size = pre.backbone.patch_embed.img_size
    dataset = data.build_dataset(run['data'], 'train', args.data_root or run['data_root'])
    tokens, _ = data.load_tokens(ckpt['tokens']['dir'], run['data'], 'train', len(dataset), pre.grid,
                                 ckpt['tokens']['vocab_size'])
    image = data.pretrain_geometry(size)(pick_image(dataset, args.index, f'{run["data"]} train')[0])
    # The pre-training input without its colour jitter (pretrain.py's transform otherwise).
    x = transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)(transforms.ToTensor()(image))
    records, visible = predict(pre, x, tokens[args.index], args.seed)
    img = predictions_figure(pre, ckpt, args.checkpoint, np.asarray(image), records, visible, args.index, args.per_row)
    stem = f'predictions_{pre.objective}_{args.index}'
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, stem + '.json')
    with open(json_path, 'w') as f:
        json.dump(dict(checkpoint=args.checkpoint, objective=pre.objective, index=args.index, seed=args.seed,
                       grid=pre.grid, visible=visible.nonzero()[:, 0].tolist(), targets=records), f, indent=1)
    print(json_path)
    return [json_path, save(img, args.out, stem + '.png')]


# ----------------------------------------------------------------------------------------------
# The command.


def get_args_parser():
    p = argparse.ArgumentParser('visualize.py', description='Pictures of masks, codebooks, token maps, token names, '
                                'pre-training curves and predictions (paper Fig. 1-5); PNGs to --out.')
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--out', default=os.path.join('runs', 'pictures'), help='output directory [runs/pictures]')
    with_data = argparse.ArgumentParser(add_help=False, parents=[common])
    with_data.add_argument('--data-root', default='data', help='where torchvision datasets are [data]')
    sub = p.add_subparsers(dest='command', required=True)

    s = sub.add_parser('masks', parents=[with_data], help='Fig. 2b-c content/query masks; Fig. 1 on an image')
    s.add_argument('--objective', default='mapet', choices=('pim', 'mapet'), help='whose masks [mapet]')
    s.add_argument('--num-patches', type=int, default=16, help='N; a square N also draws the image panels; '
                   'paper: 196 [16]')
    s.add_argument('--cut', type=int, default=5, help='visible patches, CLS excluded (paper c = cut + 1); '
                   'paper: 59 of 196 [5]')
    s.add_argument('--cell', type=int, default=None, help='pixels per mask entry [16, smaller for large N]')
    s.add_argument('--data', default='demo', help='dataset of the image panels [demo]')
    s.add_argument('--index', type=int, default=0, help='image of the panels (train split) [0]')
    s.add_argument('--seed', type=int, default=0, help='seeds the permutation of the panels [0]')
    s.add_argument('--max-steps', type=int, default=12, help='target steps shown, evenly spaced [12]')
    s.set_defaults(run=cmd_masks)

    def token_args(s, top):
        s.add_argument('--tokens', required=True, help='a tokenizer.py --out directory')
        s.add_argument('--ids', default=None, help='comma-separated token ids to show [the most used]')
        s.add_argument('--top', type=int, default=top, help=f'how many of the most used tokens [{top}]')
        s.add_argument('--per-token', type=int, default=12, help='patches per token, from distinct images [12]')
        s.add_argument('--seed', type=int, default=0, help='seeds which images the patches come from [0]')

    s = sub.add_parser('codebook', parents=[with_data], help='Fig. 3-5: image patches per token')
    token_args(s, 16)
    s.set_defaults(run=cmd_codebook)

    s = sub.add_parser('tokens', parents=[with_data], help='images beside their token maps')
    s.add_argument('--tokens', required=True, help='a tokenizer.py --out directory')
    s.add_argument('--index', type=int, nargs='+', default=[0, 1, 2], help='image indices, one row each [0 1 2]')
    s.set_defaults(run=cmd_tokens)

    s = sub.add_parser('names', parents=[with_data], help='name CLIP-feature tokens by zero-shot class prompts')
    token_args(s, 12)
    s.add_argument('--clip', default=None, help='CLIP model name or checkpoint path [the one in the token dir\'s '
                   'meta.json]; the paper: RN50x64')
    s.add_argument('--classes', default=None, help='comma-separated class names, e.g. dog,cat,airplane')
    s.add_argument('--classes-file', default=None, help='a text file of class names, one per line')
    s.set_defaults(run=cmd_names)

    s = sub.add_parser('curves', parents=[common], help='loss and token accuracy vs step of pretrain.py runs')
    s.add_argument('logs', nargs='+', help='log.jsonl files of pretrain.py runs')
    s.add_argument('--labels', default=None, help='comma-separated legend names [run directory (objective)]')
    s.set_defaults(run=cmd_curves)

    s = sub.add_parser('predictions', parents=[common], help='predicted vs true tokens of one image\'s targets')
    s.add_argument('--checkpoint', required=True, help='ckpt.pt of a pretrain.py run')
    s.add_argument('--index', type=int, default=0, help='image index in the training set [0]')
    s.add_argument('--seed', type=int, default=0, help='seeds the permutation (pim, mapet) or mask (mim, beit) [0]')
    s.add_argument('--per-row', type=int, default=16, help='targets per strip row [16]')
    s.add_argument('--data-root', default=None, help='where torchvision datasets are [the run\'s]')
    s.set_defaults(run=cmd_predictions)
    return p


def main(argv=None):
    """Run one subcommand; returns the paths it wrote."""
    args = get_args_parser().parse_args(argv)
    try:
        for key in ('cell', 'max_steps', 'top', 'per_token', 'per_row'):
            if getattr(args, key, None) is not None and getattr(args, key) < 1:
                raise ValueError(f'--{key.replace("_", "-")} must be at least 1, got {getattr(args, key)}')
        return args.run(args)
    except (ValueError, OSError) as e:  # bad input, a missing or unreadable file: one line
        raise SystemExit(f'visualize.py {args.command}: {e}') from None


if __name__ == '__main__':
    main()
