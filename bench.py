"""How fast is a pre-training step, and how far from the hardware? (README "Speed")

A forward + backward step of model.py's Pretrainer per objective (Sec. 3-4.1) beside a naive
two-stream step: time, peak memory, FLOPs, MFU, masks' cost; then Sec. 4.2's tokenizer and the
input pipeline (JPEG decoding against the decoded-image cache, README "Paper scale").

    python bench.py --threads 2                               # CPU: ViT-T, batch 8, fp32 (~6 min)
    python bench.py --quick                                   # smoke test, under a minute
    python bench.py --device cuda --compile --json gpu.jsonl  # GPU: ViT-B, batch 128, bf16
    python bench.py --gpu-check                               # the README's GPU check (< 8 min)

Variants take turns, a step of each and a matmul per round, so all see the same load.
± is the inter-quartile range.
"""
import argparse
import contextlib
import functools
import gc
import itertools
import json
import math
import os
import tempfile
import time
from statistics import median, quantiles

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

import clip_model
import data
import pretrain
import tokenizer
import training
from model import MODEL_CONFIGS, OBJECTIVES, Pretrainer, build_masks, create_model

# The oracle: two-stream attention (Sec. 4.1, Eq. 3) as research code writes it, on the
# Pretrainer's weights; tests/test_bench.py checks it has model.py's loss and gradients.


def naive_masks(perm, cut, objective, num_heads, device):
    """Additive masks (0 or -inf) per sample, on the CPU, expanded over heads, in raster order:
    content (B, H, L, L) over [CLS | N patches | M mask tokens (mapet)], query (B, H, M, L)."""
    N = perm.shape[1]
    content, query = [], []
    for p in perm.cpu():
        rank = torch.empty(N, dtype=torch.long)
        rank[p] = torch.arange(N)  # a patch's place in perm: the first `cut` are visible
        targets = p[cut:].sort().values  # (M,)
        tokens = [rank[targets]] if objective == 'mapet' else []  # a mask token has its target's
        r = torch.cat([torch.tensor([-1]), rank, *tokens])  # every column's rank, CLS first
        is_token = torch.arange(len(r)) > N
        is_context = (r < cut) & ~is_token  # CLS + visible
        is_target = ~is_context & ~is_token
        row_is_target, not_later = is_target[:, None], r[None, :] <= r[:, None]  # [row, column]
        content.append(is_context  # seen by every row
                       | (row_is_target & is_target & not_later)  # targets up to itself
                       | (is_token & ~(row_is_target & not_later)))  # later targets' tokens
        r_query = rank[targets][:, None]  # (M, 1); Eq. 2:
        query.append(is_context | (is_target & (r < r_query)) | (is_token & (r >= r_query)))
    return [torch.zeros(ok.shape).masked_fill(~ok, float('-inf'))[:, None]
            .repeat(1, num_heads, 1, 1).to(device) for ok in map(torch.stack, (content, query))]


def naive_attention(attn, x, context, mask):  # q from x, k and v from context
    w, b, H = attn.qkv.weight.chunk(3), attn.qkv.bias.chunk(3), attn.num_heads
    q, k, v = (F.linear(y, w[i], b[i]).unflatten(-1, (H, -1)).transpose(1, 2)  # (B, H, T, hd)
               for i, y in enumerate((x, context, context)))
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + mask  # (B, H, T, L)
    return attn.proj((scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2))


def naive_block(blk, h, g, content_mask, query_mask, keep):
    """Eq. 3: h attends to h (content mask), g to h (query mask)."""
    h_in, g_in = blk.norm1(h), blk.norm1(g)
    h = h + keep * blk.ls1(naive_attention(blk.attn, h_in, h_in, content_mask))
    g = g + keep * blk.ls1(naive_attention(blk.attn, g_in, h_in, query_mask))
    h = h + keep * blk.ls2(blk.mlp(blk.norm2(h)))
    g = g + keep * blk.ls2(blk.mlp(blk.norm2(g)))
    return h, g


def naive_step(pre, images, tokens, perm, content_mask, query_mask, drop_draws):
    """A Pretrainer's step, h and g separate; targets in raster order."""
    vit, B = pre.backbone, images.shape[0]
    targets = perm[:, pre.cut:].sort(dim=1).values  # (B, M)
    patches = vit.patch_embed(images) + vit.pos_embed[:, 1:]  # (B, N, D)
    cls = (vit.cls_token + vit.pos_embed[:, :1]).expand(B, -1, -1)
    g = pre.mask_token + vit.pos_embed[0, 1:][targets]  # (B, M, D), Sec. 4.1
    tokens_in_h = [g] if pre.objective == 'mapet' else []  # Eq. 2
    h = torch.cat([cls, patches, *tokens_in_h], dim=1)  # (B, L, D)
    for i, blk in enumerate(vit.blocks):
        rate = blk.drop_path.p if pre.training else 0.0
        keep = (drop_draws[:, i, None, None] >= rate) / (1 - rate)  # (B, 1, 1), as model.py
        h, g = naive_block(blk, h, g, content_mask, query_mask, keep)
    logits = pre.decoder(pre.norm(g))  # (B, M, K)
    labels = tokens.reshape(B, -1).long().gather(1, targets)
    return logits, F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def seconds(fn):
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else lambda: None
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def sdpa_flops(q, k, v, *args, **kwargs):
    """Dense q k^T and p v, from the shapes."""
    return 2 * q[0] * q[1] * q[2] * k[2] * (q[3] + v[3])


# FlopCounterMode counts GPU attention kernels, not the CPU one: add it (backward 2x forward).
CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, *args, **kwargs: 2 * sdpa_flops(*args),
}


def count_flops(step):
    """FLOPs of a step and its SDPA kernel (e.g. flash_attention_for_cpu)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        step()
    prefix = 'aten._scaled_dot_product_'
    kernels = [str(op)[len(prefix):].removesuffix('.default')
               for op in counter.get_flop_counts().get('Global', {})
               if str(op).startswith(prefix) and 'backward' not in str(op)]
    return counter.get_total_flops(), (kernels or ['math'])[0]


@contextlib.contextmanager
def profiler(**kwargs):
    """torch.profiler, its C++ log lines kept off stderr."""
    saved = os.dup(2)
    with open(os.devnull, 'w') as null:
        os.dup2(null.fileno(), 2)
        try:
            with torch.profiler.profile(**kwargs) as prof:
                yield prof
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def step_memory(fn, device):
    """Peak bytes fn() holds; on a CPU, from the running sum of profiled allocations and frees."""
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        return torch.cuda.max_memory_allocated(device) - base
    with profiler(profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == '[memory]' and e.device_type() == torch.autograd.DeviceType.CPU)
    return max(itertools.accumulate(nbytes for _, nbytes in events), default=0)


class Variant:
    """A step on inputs prepared once; a fresh step prepares its own (the naive masks count)."""

    def __init__(self, name, pre, forward, prepare, args):  # name: objective impl [compiled]
        self.name, self.pre, self.forward, self.prepare = name, pre, forward, prepare
        self.objective, self.impl, *compiled = name.split()
        self.compiled, self.inputs, self.times = bool(compiled), prepare(), []
        self.dtype, self.device = training.DTYPES[args.dtype], torch.device(args.device)

    def step(self, fresh=False):
        self.pre.zero_grad(set_to_none=True)
        with training.autocast(self.dtype, self.device):
            _, loss = self.forward(*(self.prepare() if fresh else self.inputs))
        loss.backward()


def variants_for(objective, args, images, tokens):
    """model.py's step (and compiled) and the naive one, on the same weights and inputs."""
    torch.manual_seed(0)  # every objective starts from the same weights
    vit = create_model(args.model, drop_path_rate=0.1, **({'depth': 2} if args.quick else {}))
    device = images.device
    pre = Pretrainer(vit, objective, vocab_size=args.vocab_size, cut=args.cut).to(device).train()
    perm = pre.draw_perm(args.batch, device) if pre.two_stream else None
    mask = None if pre.two_stream else pre.draw_mask(args.batch, device)
    draws = pre.draw_drop(args.batch, device)

    def ours():
        return images, tokens, perm, mask, draws

    def naive():
        masks = naive_masks(perm, pre.cut, objective, vit.blocks[0].attn.num_heads, device)
        return images, tokens, perm, *masks, draws

    variants = [Variant(f'{objective} ours', pre, pre, ours, args)]
    if args.compile:
        variants.append(Variant(f'{objective} ours compiled', pre, torch.compile(pre), ours, args))
    if pre.two_stream and args.reference:
        variants.append(Variant(f'{objective} naive', pre, functools.partial(naive_step, pre),
                                naive, args))
    return variants


def time_in_turns(variants, matmul, args):
    """Fills v.times; returns the matmul's."""
    for v in variants:
        if v.compiled:  # the first call compiles: untimed
            print(f'compiled {v.name} in {seconds(v.step):.0f} s')
    matmul_times = []
    for _ in range(args.warmup + args.repeats):
        matmul_times.append(seconds(matmul))
        for v in variants:
            v.times.append(seconds(v.step))
    for v in variants:
        del v.times[:args.warmup]
    return matmul_times[args.warmup:]


def step_row(v, args, peak_flops, flops):
    if v.compiled:  # FlopCounterMode cannot see a compiled graph
        total, backend = flops[v.objective][0], 'compiled ' + flops[v.objective][1]
    else:
        total, backend = flops[v.objective] = count_flops(v.step)
        backend = 'explicit softmax' if v.impl == 'naive' else backend
    v.pre.zero_grad(set_to_none=True)  # the step's gradients count as its memory
    memory = step_memory(lambda: v.step(fresh=True), v.device)
    pre, mask_ms = v.pre, None
    if pre.two_stream:  # ours stacks build_masks' cached pair, as model.py does
        def ours():
            return torch.cat(build_masks(v.objective, pre.num_patches, pre.cut, v.device))
        build, repeats = (v.prepare, 5) if v.impl == 'naive' else (ours, 200)
        mask_ms = 1e3 * median(seconds(build) for _ in range(repeats))
    q1, mid, q3 = quantiles(v.times, n=4) if len(v.times) > 1 else v.times * 3
    return {'kind': 'step', 'variant': v.name, 'objective': v.objective, 'impl': v.impl,
            'step_ms': mid * 1e3, 'iqr_ms': (q3 - q1) * 1e3,
            'img_s': args.batch / mid, 'peak_mem_mb': memory / 2 ** 20,
            'gflop_per_img': total / args.batch / 1e9, 'tflop_s': total / mid / 1e12,
            'mfu': total / mid / peak_flops, 'sdpa': backend, 'mask_ms': mask_ms}


def table_line(r=None):
    if r is None:
        return (f'{"variant":<22} {"step ms":>9} {"±IQR":>6} {"img/s":>8} {"mem MB":>8} '
                f'{"GFLOP/img":>9} {"TFLOP/s":>8} {"MFU":>6} {"mask ms":>8}  attention')
    mask = '-' if r['mask_ms'] is None else f'{r["mask_ms"]:.3f}'
    return (f'{r["variant"]:<22} {r["step_ms"]:9.1f} {r["iqr_ms"]:6.0f} {r["img_s"]:8.2f} '
            f'{r["peak_mem_mb"]:8.0f} {r["gflop_per_img"]:9.2f} {r["tflop_s"]:8.3f} '
            f'{r["mfu"]:6.1%} {mask:>8}  {r["sdpa"]}')


def targets(rows, gpu):
    """(name, value, op, target): README's (ViT-T, fp32, 2 CPU cores; ViT-B, bf16, an H100)."""
    get, checks = {r['variant']: r for r in rows}.get, []
    for obj in ('pim', 'mapet'):
        ours, naive = get(f'{obj} ours'), get(f'{obj} naive')
        if ours and naive:
            best = max(ours, get(f'{obj} ours compiled', ours), key=lambda r: r['img_s'])
            checks += [
                (f'{obj} step time, naive / ours', naive['step_ms'] / ours['step_ms'], '>=', 1.15),
                (f'{obj} peak memory, ours / naive', ours['peak_mem_mb'] / naive['peak_mem_mb'],
                 '<=', 0.8),
                (f'{obj} mask cost per batch, naive / ours', naive['mask_ms'] / ours['mask_ms'],
                 '>=', 100)]
            checks += [(f'{obj} img/s, {best["variant"][len(obj) + 1:]} / naive',
                        best['img_s'] / naive['img_s'], '>=', 1.5)] if gpu else []
    mim, mapet = get('mim ours'), get('mapet ours')
    if mim and mapet:  # its 1 + N + 2M rows per block cost what their FLOPs cost
        checks.append(('mapet/mim step-time ratio / FLOP ratio', mapet['step_ms'] / mim['step_ms']
                       / (mapet['gflop_per_img'] / mim['gflop_per_img']), '<=', 1.05))
    return checks + [(r['variant'].replace(' ours', '') + ' MFU', r['mfu'], '>=',
                      0.4 if gpu else 0.55) for r in rows if r['variant'].startswith('mapet ours')]


def tokenizer_speed(args, device):
    """Sec. 4.2: CLIP RN50's features/s (random weights); a Lloyd iteration on 1M x 2048 points,
    K = 8192 (a CPU: 8192 points, scaled)."""
    quick, gpu, repeats = args.quick, device.type == 'cuda', 2 if args.quick else 3
    tiny = {'vision_layers': (1, 1, 1, 1), 'vision_width': 8, 'embed_dim': 64,
            'transformer_width': 64, 'transformer_layers': 1}
    clip = clip_model.CLIP(clip_model.CLIPConfig(**(tiny if quick else {}))).to(device).eval()
    batch, size = 1 if quick else 64 if gpu else 4, args.clip_size
    features = functools.partial(tokenizer.clip_features, clip,
                                 torch.randn(batch, 3, size, size, device=device))
    features()
    img_s = batch / median(seconds(features) for _ in range(repeats))
    points, C, K = (1024, 32, 64) if quick else (1_000_000, 2048, 8192)
    n = points if quick or gpu else 8192
    x, centroids = torch.randn(n, C, device=device), torch.randn(K, C, device=device)
    lloyd = functools.partial(tokenizer.kmeans, x, K, iters=0, init=centroids)
    s = median(seconds(lloyd) for _ in range(repeats))
    return ({'kind': 'clip', 'model': 'tiny ResNet' if quick else 'RN50', 'size': size,
             'batch': batch, 'img_s': img_s, 'features_s': img_s * (size // 32) ** 2},
            {'kind': 'kmeans', 'points': points, 'dim': C, 'k': K, 'measured_points': n,
             'iteration_s': s * points / n, 'tflop_s': 2 * n * C * K / s / 1e12})


# The input pipeline: images/s from one loader process (README "Paper scale").

PAPER_IMG_S = 1660  # a ViT-B MaPeT step at 40 % of an H100's bf16 peak: what a GPU eats

def imagenet_like_jpegs(root, count):
    """500 x 375 JPEGs at quality 90, smooth colours plus noise: ImageNet's typical file."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, 'train', 'c'))
    for i in range(count):
        smooth = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
            (500, 375), Image.BICUBIC)
        pixels = np.asarray(smooth) + rng.normal(0, 12, (375, 500, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
            os.path.join(root, 'train', 'c', f'{i}.jpg'), quality=90)


def input_speed(args, device):
    """Per image: (a) PIL decode, crop, ColorJitter, normalise, as pretrain.py without a cache;
    (b) writing the cache; (c) a loader process on the cache: uint8 crops and the jitter draws
    (data.KeyedSet); (d) data.color_jitter on the device; (e) (c) and (d) in one process."""
    size, n, batch = MODEL_CONFIGS[args.model]['img_size'], 8 if args.quick else 48, 64
    with tempfile.TemporaryDirectory() as root:
        imagenet_like_jpegs(root, n)
        folder = data.build_dataset(root, 'train', transform=pretrain.pil_transform(size, 0.4))
        jpeg = n / median(seconds(lambda: [folder[i] for i in range(n)]) for _ in range(2))
        write = data.write_image_cache(root, 'train', size, root)
        jitter = functools.partial(data.draw_jitter, strength=0.4)
        keyed = data.KeyedSet(data.CachedImages(root, root, 'train', size, folder), 0,
                              [(0, jitter)])
        keys = [(0, i % n) for i in range(4 * batch)]
        batches = []
        read = len(keys) / seconds(lambda: batches.extend(DataLoader(keyed, batch, sampler=keys)))
        on_device = [(b[2].to(device), b[4].to(device)) for b in batches]
        jittered = len(keys) / median(seconds(lambda: [data.color_jitter(*b) for b in on_device])
                                      for _ in range(2))
    both = 1 / (1 / read + 1 / jittered)
    rows = [('JPEG: PIL decode, crop, jitter', jpeg, True), ('cache: write once', write, False),
            ('cache: loader (crops + draws)', read, True),
            (f'cache: color_jitter on {device.type}', jittered, False),
            ('cache: loader + jitter, one process', both, False)]
    return [{'kind': 'input', 'path': path, 'size': size, 'img_s': img_s,  # loader processes
             'processes_per_gpu': PAPER_IMG_S / img_s if loader else None}  # a GPU needs
            for path, img_s, loader in rows] + [
        {'kind': 'target', 'name': name, 'value': value, 'op': '>=', 'target': target,
         'passed': value >= target} for name, value, target in (
            ('input: cache + jitter / JPEG, per process', both / jpeg, 20),
            ('input: cache + jitter img/s, one process', both, 3000))]


def fp16_check(args, device, steps=30):
    """The V100 path: fp16 autocast + GradScaler, a fixed batch whose tokens use 16 codes, so the
    loss must fall from ln K as the classifier learns them."""
    torch.manual_seed(0)
    cfg = MODEL_CONFIGS[args.model]
    pre = Pretrainer(create_model(args.model, **({'depth': 2} if args.quick else {})), 'mapet',
                     vocab_size=args.vocab_size).to(device)
    optimizer = torch.optim.AdamW(pre.parameters(), lr=1e-3)
    scaler, losses = training.grad_scaler(torch.float16, device), []
    images = torch.randn(args.batch, 3, cfg['img_size'], cfg['img_size'], device=device)
    tokens = torch.randint(16, (args.batch, pre.num_patches), device=device)
    for _ in range(steps):
        with training.autocast(torch.float16, device):
            loss = pre(images, tokens)[1]
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    ok = all(map(math.isfinite, losses)) and median(losses[-5:]) < median(losses[:5]) - 1
    return {'kind': 'fp16', 'steps': steps, 'first_loss': losses[0], 'last_loss': losses[-1],
            'scale': scaler.get_scale() if scaler.is_enabled() else 1.0, 'passed': ok}


def end_to_end(args, step_img_s, steps=40):
    """pretrain.py's whole loop on --data synthetic: loader, device jitter, step, AdamW."""
    with tempfile.TemporaryDirectory() as out:
        pretrain.main(['--data', 'synthetic', '--model', args.model, '--batch-size',
                       str(args.batch), '--steps', str(steps), '--epochs', '1', '--warmup-epochs',
                       '0', '--dtype', args.dtype, '--device', args.device, '--out', out,
                       '--log-every', str(steps // 4), '--save-every', str(10 * steps)]
                      + ['--compile'] * args.compile)
        with open(os.path.join(out, 'log.jsonl')) as f:
            img_s = json.loads(f.readlines()[-1])['img_per_s']  # the last quarter: warm
    row = {'kind': 'end_to_end', 'img_s': img_s, 'step_only_img_s': step_img_s}
    return [row] + ([{'kind': 'target', 'name': 'end-to-end / step-only img/s',
                      'value': img_s / step_img_s, 'op': '>=', 'target': 0.9,
                      'passed': img_s >= 0.9 * step_img_s}] if step_img_s else [])


def get_args_parser():
    p = argparse.ArgumentParser('bench', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add('--model', choices=list(MODEL_CONFIGS), help='[tiny; base on a GPU]')
    add('--batch', type=int, help='[8; 128 on a GPU] (paper: 2048)')
    add('--dtype', default='auto', choices=['auto', *training.DTYPES],
        help='[auto: bf16 on Ampere+, fp16 on older GPUs, fp32 on CPU]')
    add('--vocab-size', type=int, default=8192, help='visual tokens (paper: 8192)')
    add('--cut', type=int, help='pim/mapet visible patches [0.3 N, Tab. 6]')
    add('--objectives', nargs='+', default=list(OBJECTIVES), choices=OBJECTIVES)
    add('--reference', action=argparse.BooleanOptionalAction, default=True,
        help='time the naive step too')
    add('--compile', action='store_true', help='also time torch.compile (minutes)')
    add('--device', default='cpu', help='cpu | cuda | cuda:N')
    add('--threads', type=int, help="CPU threads [torch's choice]")
    add('--repeats', type=int, help='timed steps per variant [10; quick 2]')
    add('--warmup', type=int, help='untimed steps per variant [2; quick 0]')
    add('--profile', action='store_true', help="torch.profiler's top ops per variant")
    add('--tokenizer', action=argparse.BooleanOptionalAction, default=True,
        help='time CLIP and k-means too (Sec. 4.2)')
    add('--clip-size', type=int, help='CLIP input size [448: a 14x14 grid]')
    add('--quick', action='store_true', help='micro ViT, depth 2, batch 2')
    add('--input', action=argparse.BooleanOptionalAction, default=True,
        help='time the input pipeline too')
    add('--gpu-check', action='store_true', help='the README\'s GPU check: ViT-B MaPeT bf16 '
        'eager and compiled against naive, fp16 + GradScaler, the input pipeline, end to end')
    add('--json', help='a file for the rows as JSON lines')
    return p


def resolve_args(args):
    if args.gpu_check:
        if not args.quick and not torch.cuda.is_available():
            raise SystemExit('--gpu-check: no GPU is visible (`--gpu-check --quick` is its '
                             'smoke test on a CPU)')
        args.device = 'cuda' if args.device == 'cpu' and not args.quick else args.device
        args.compile, args.tokenizer, args.objectives = not args.quick, False, ['mapet']
    gpu, q = args.device.startswith('cuda'), args.quick
    if args.device != 'cpu' and not (gpu and torch.cuda.is_available()):
        raise SystemExit(f'--device {args.device}: use cpu, or cuda where a GPU is visible')
    defaults = {'model': 'micro' if q else 'base' if gpu else 'tiny', 'repeats': 2 if q else 10,
                'batch': 2 if q else 128 if gpu else 8, 'warmup': 0 if q else 2,
                'clip_size': 64 if q else 448}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ('batch', 'repeats', 'vocab_size', 'threads', 'clip_size', 'warmup'):
        value, least = getattr(args, name), 0 if name == 'warmup' else 1
        if value is not None and value < least:
            raise SystemExit(f'--{name.replace("_", "-")} must be at least {least}, got {value}')
    if args.clip_size % 32:
        raise SystemExit(f'--clip-size {args.clip_size}: use a multiple of 32, CLIP\'s stride')
    args.dtype = str(training.resolve_dtype(args.dtype, torch.device(args.device)))[6:]  # torch.
    return args


def machine_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:
        return next((ln.split(':')[1].strip() for ln in f if ln.startswith('model name')), 'CPU')
    return 'CPU'


def bench_steps(args, device, emit):
    cfg, gpu = MODEL_CONFIGS[args.model], device.type == 'cuda'
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, cfg['img_size'], cfg['img_size'], device=device)
    N = (cfg['img_size'] // cfg['patch_size']) ** 2
    tokens = torch.randint(args.vocab_size, (args.batch, N), device=device)
    variants = [v for obj in args.objectives for v in variants_for(obj, args, images, tokens)]
    # Attainable peak: n x n x n matmuls in the step's dtype, timed in the turns.
    n, calls = (8192, 20) if gpu else (256 if args.quick else 2048, 1)
    a, b = torch.randn(2, n, n, device=device).to(training.DTYPES[args.dtype])
    times = time_in_turns(variants, lambda: [torch.mm(a, b) for _ in range(calls)], args)
    peak = 2 * n ** 3 * calls / median(times)
    emit({'kind': 'matmul', 'n': n, 'tflop_s': peak / 1e12})
    print(table_line())
    flops, rows = {}, []
    for v in variants:
        rows.append(step_row(v, args, peak, flops))
        emit(rows[-1], table_line(rows[-1]))
    for v in variants if args.profile else []:
        with profiler() as prof:
            v.step()
        print(f'\ntorch.profiler, one step of {v.name}:\n' + prof.key_averages().table(
            sort_by=f'self_{"device" if gpu else "cpu"}_time_total', row_limit=12))
    for name, value, op, target in targets(rows, gpu):
        ok = value >= target if op == '>=' else value <= target
        row = {'kind': 'target', 'name': name, 'value': value, 'op': op, 'target': target,
               'passed': ok}
        emit(row, target_line(row))
    best = max((r for r in rows if r['variant'].startswith('mapet ours')),
               key=lambda r: r['img_s'], default=None)
    if gpu and best:  # the paper: 300 epochs of ImageNet-1k in ~1 day on 64 V100s
        emit({'kind': 'estimate', 'of': "the paper's MaPeT run on 8 such GPUs",
              'hours': 300 * 1_281_167 / (8 * best['img_s']) / 3600,
              'img_s_per_gpu': best['img_s'], 'paper_hours': 24})
    return rows


def target_line(r):
    return (f'target: {r["name"]:<45} {r["value"]:8.3f} {r["op"]} {r["target"]:<5} '
            f'{"pass" if r["passed"] else "MISS"}')


def main(argv=None):
    args = resolve_args(get_args_parser().parse_args(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    device, rows = torch.device(args.device), []

    def emit(row, text=None):  # print as given or as `kind: key value`
        rows.append(row)
        fields = [f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in row.items()]
        print(text or f'{row["kind"]}: ' + ', '.join(fields[1:]))

    emit({'kind': 'machine', 'device': machine_name(device), 'threads': torch.get_num_threads(),
          'torch': torch.__version__, 'model': args.model,
          'img_size': MODEL_CONFIGS[args.model]['img_size'], 'batch': args.batch,
          'dtype': args.dtype, 'vocabulary': args.vocab_size, 'repeats': args.repeats})
    steps = bench_steps(args, device, emit)
    for row in tokenizer_speed(args, device) if args.tokenizer else []:
        emit(row)
    extra = input_speed(args, device) if args.input else []
    if args.gpu_check:
        best = max((r['img_s'] for r in steps if r['objective'] == 'mapet'), default=0)
        extra += [fp16_check(args, device), *end_to_end(args, best)]
    for row in extra:
        emit(row, target_line(row) if row['kind'] == 'target' else None)
    if args.json:
        with open(args.json, 'w') as f:
            f.writelines(json.dumps(row) + '\n' for row in rows)
    return rows


if __name__ == '__main__':
    main()
