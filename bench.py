"""How fast is a pre-training step, and how far from the hardware? (DESIGN "Scale and speed")

For each objective (MIM, BEiT, PIM, MaPeT; paper Sec. 3-4.1) one forward+backward step of
model.py's Pretrainer is timed, side by side with a naive two-stream reference written the way
typical research code does it (per-sample float masks built on the CPU and expanded over heads,
two attention computations per block with an explicit softmax, both streams computed in every
block). Per row: median step time, img/s, peak step memory, model FLOPs per image counted by
torch.utils.flop_counter.FlopCounterMode, achieved FLOP/s as a fraction of the device's own
matmul peak (a large torch.mm in the same dtype, timed in the same run), and the cost of the
attention masks per batch. Then the tokenizer's two heavy parts (Sec. 4.2): CLIP RN50 dense
features/s at 448 px and one k-means iteration (1M x 2048 points, K = 8192, chunked).

    python bench.py --threads 2                               # CPU: ViT-T, 224 px, batch 8, fp32 (~6 min)
    python bench.py --quick                                   # a smoke test, a few seconds
    python bench.py --device cuda --compile --json gpu.jsonl  # GPU: ViT-B, batch 128, bf16, eager + compiled
    python bench.py --profile --no-tokenizer                  # plus torch.profiler's top ops per variant

Variants are timed in turns (one step of each, repeated), so on a shared machine every variant
sees the same load; the spread printed beside each median is the inter-quartile range. Step
memory is the peak of what one step allocates beyond the resident parameters (its inputs, masks,
activations, gradients): torch.cuda's peak counter on a GPU, the profiler's allocation events
on a CPU. On a GPU the last line estimates the paper's run (ViT-B MaPeT, 300 epochs of
ImageNet-1k) on 8 such GPUs, beside the paper's ~1 day on 64 V100s.

Shape letters: B batch, N patches, M targets, L content-stream length, D width, H heads,
K vocabulary, C feature dim.
"""
import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import clip_model
import tokenizer
import training
from model import MODEL_CONFIGS, OBJECTIVES, Pretrainer, build_masks, create_model

IMAGENET_TRAIN = 1_281_167  # images in ImageNet-1k's training split
PAPER_EPOCHS = 300          # Tab. 7
PAPER_GPU_DAYS = (64, 1.0)  # ViT-B MaPeT: about 1 day on 64 V100s (~70 img/s per GPU)

# ----------------------------------------------------------------------------------------------
# The naive reference: the two-stream step as typical research code writes it (Sec. 4.1, Eq. 3).
# It reads the Pretrainer's own parameters, so both compute the same loss for the same
# permutation (tests/test_bench.py checks loss and gradients); only the way differs.


def naive_masks(perm, cut, objective, num_heads, device):
    """Per-sample additive float masks (0 = may attend, -inf = may not) in raster order, built on
    the CPU one sample at a time and expanded over heads: content (B, H, L, L), query (B, H, M, L).

    Content layout: [CLS | N patches, raster order | M mask tokens (mapet), raster order of their
    target]; query rows: the M targets in raster order. r is a patch's rank in the permutation."""
    B, N = perm.shape
    mapet = objective == 'mapet'
    content, query = [], []
    for p in perm.cpu():
        rank = torch.empty(N, dtype=torch.long)
        rank[p] = torch.arange(N)
        targets = p[cut:].sort().values                                     # (M,) raster order
        # Every element's rank (CLS ranks before everything) and whether it is a mask token.
        key_rank = torch.cat([torch.tensor([-1]), rank] + ([rank[targets]] if mapet else []))
        is_token = torch.zeros(len(key_rank), dtype=torch.bool)
        is_token[1 + N:] = True
        context = (key_rank < cut) & ~is_token                              # CLS + visible patches
        is_target = ~context & ~is_token
        later = key_rank[None, :] > key_rank[:, None]                       # [row, col]: r(col) > r(row)
        allowed = (context[None, :]
                   | (is_target[:, None] & is_target[None, :] & ~later)     # targets r <= r(row)
                   | (is_token[None, :] & ~(is_target[:, None] & ~later)))  # mask tokens, Eq. 2
        q_rank = rank[targets][:, None]                                     # (M, 1)
        q_allowed = (context[None, :] | (is_target[None, :] & (key_rank[None, :] < q_rank))
                     | (is_token[None, :] & (key_rank[None, :] >= q_rank)))
        for masks, ok in ((content, allowed), (query, q_allowed)):
            additive = torch.zeros(ok.shape).masked_fill(~ok, float('-inf'))
            masks.append(additive.expand(num_heads, -1, -1))
    return torch.stack(content).to(device), torch.stack(query).to(device)


class NaiveTwoStream:
    """forward(images, tokens, perm, content_mask, query_mask) -> (logits, loss), with the
    Pretrainer's weights; logits (B, M, K) for the targets in raster order."""

    def __init__(self, pre):
        self.pre = pre

    def attention(self, attn, x_q, x_kv, mask):
        """Explicit softmax(q k^T / sqrt(hd) + mask) v; q from x_q, k and v projected from x_kv."""
        B, T, D = x_q.shape
        H = attn.num_heads
        w_q, w_k, w_v = attn.qkv.weight.chunk(3)
        b_q, b_k, b_v = attn.qkv.bias.chunk(3)
        q = F.linear(x_q, w_q, b_q).view(B, T, H, D // H).transpose(1, 2)                # (B, H, T, hd)
        k = F.linear(x_kv, w_k, b_k).view(B, -1, H, D // H).transpose(1, 2)              # (B, H, L, hd)
        v = F.linear(x_kv, w_v, b_v).view(B, -1, H, D // H).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(D // H) + mask                       # (B, H, T, L)
        out = scores.softmax(dim=-1) @ v
        return attn.proj(out.transpose(1, 2).reshape(B, T, D))

    def drop_path(self, x, p):
        """One keep/drop draw per sample, shared by both streams (as DropPath in model.py)."""
        if not self.pre.training or p == 0:
            return None
        return x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - p) / (1 - p)

    def block(self, blk, h, g, content_mask, query_mask):
        keep = self.drop_path(h, blk.drop_path.p)
        scale = (lambda y: y) if keep is None else (lambda y: y * keep)
        hn, gn = blk.norm1(h), blk.norm1(g)
        h_att = self.attention(blk.attn, hn, hn, content_mask)              # content stream
        g_att = self.attention(blk.attn, gn, hn, query_mask)                # query stream
        h, g = h + scale(blk.ls1(h_att)), g + scale(blk.ls1(g_att))
        keep = self.drop_path(h, blk.drop_path.p)
        scale = (lambda y: y) if keep is None else (lambda y: y * keep)
        h = h + scale(blk.ls2(blk.mlp(blk.norm2(h))))
        g = g + scale(blk.ls2(blk.mlp(blk.norm2(g))))
        return h, g

    def __call__(self, images, tokens, perm, content_mask, query_mask):
        pre, bb = self.pre, self.pre.backbone
        B = images.shape[0]
        targets = perm[:, pre.cut:].sort(dim=1).values                      # (B, M) raster order
        x = bb.patch_embed(images) + bb.pos_embed[:, 1:]                    # (B, N, D)
        cls = (bb.cls_token + bb.pos_embed[:, :1]).expand(B, -1, -1)
        g = pre.mask_token + bb.pos_embed[0, 1:][targets]                   # (B, M, D)
        h = torch.cat([cls, x] + ([g] if pre.objective == 'mapet' else []), dim=1)  # (B, L, D)
        for blk in bb.blocks:
            h, g = self.block(blk, h, g, content_mask, query_mask)
        logits = pre.decoder(pre.norm(g))                                   # (B, M, K)
        labels = tokens.reshape(B, -1).long().gather(1, targets)
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


# ----------------------------------------------------------------------------------------------
# Measuring: time, memory, FLOPs, the matmul peak, the profile.


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def sdpa_flops(query_shape, key_shape, value_shape):
    """FLOPs of one attention call: q k^T and p v, dense (a mask does not skip work)."""
    B, H, T, hd = query_shape
    return 2 * B * H * T * key_shape[2] * (hd + value_shape[3])


# FlopCounterMode counts the GPU attention kernels but not the CPU one: add it (backward = 2x
# forward: gradients of q, k, v and of the probabilities, as FlopCounterMode counts on a GPU).
CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *a, **kw: sdpa_flops(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, q, k, v, *a, **kw: 2 * sdpa_flops(q, k, v),
}
SDPA_BACKENDS = {  # the aten op a scaled_dot_product_attention call dispatched to -> its name
    'aten._scaled_dot_product_flash_attention_for_cpu': 'flash (CPU)',
    'aten._scaled_dot_product_flash_attention': 'flash',
    'aten._scaled_dot_product_efficient_attention': 'memory-efficient',
    'aten._scaled_dot_product_cudnn_attention': 'cuDNN',
}


@contextlib.contextmanager
def quiet_stderr():
    """The profiler's C++ side prints start/stop lines on file descriptor 2; keep the table clean."""
    saved = os.dup(2)
    with open(os.devnull, 'w') as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def cpu_step_memory(fn):
    """Peak bytes that fn() holds at once, from the profiler's allocation events: the running sum
    of what fn allocates and frees (frees of blocks allocated before fn are not fn's)."""
    from torch._C._profiler import _EventType
    with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == 'cpu':
            events.append(event)
        stack.extend(event.children)
    live, peak, mine = 0, 0, set()
    for event in sorted(events, key=lambda e: e.start_time_ns):
        ptr, size = event.extra_fields.ptr, event.extra_fields.alloc_size
        if size > 0:
            mine.add(ptr)
        elif ptr not in mine:
            continue
        else:
            mine.discard(ptr)
        live += size
        peak = max(peak, live)
    return peak


def step_memory(fn, device):
    gc_collect(device)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        return torch.cuda.max_memory_allocated(device) - base
    return cpu_step_memory(fn)


def gc_collect(device):
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def median_iqr(times):
    if len(times) < 2:
        return times[0], 0.0
    q1, q2, q3 = statistics.quantiles(times, n=4)
    return q2, q3 - q1


def matmul_sample(n, dtype, device, calls):
    """One timing of `calls` n x n x n matmuls: the device's attainable peak (FLOP/s) in dtype."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def run():
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b)
        sync(device)
        return 2 * n ** 3 * calls / (time.perf_counter() - start)
    return run


def top_ops(fn, device, rows=12):
    """torch.profiler's table of the ops that took the most time in one fn()."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with quiet_stderr(), torch.profiler.profile(activities=acts) as prof:
        fn()
        sync(device)
    key = 'self_device_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    return prof.key_averages().table(sort_by=key, row_limit=rows)


# ----------------------------------------------------------------------------------------------
# The variants: each is a callable step over inputs prepared outside the timer.


@dataclass
class Variant:
    objective: str
    impl: str                        # 'ours' (model.py) or 'naive' (the reference above)
    compiled: bool
    pre: Pretrainer
    forward: Callable                # (*inputs) -> (logits, loss)
    prepare: Callable                # () -> inputs; the naive masks are built here, per batch
    inputs: tuple = ()
    times: list = None

    @property
    def name(self):
        return f'{self.objective} {self.impl}' + (' compiled' if self.compiled else '')


def make_variants(args, device, images, tokens):
    variants = []
    for objective in args.objectives:
        torch.manual_seed(args.seed)                        # every objective starts from the same weights
        backbone = create_model(args.model, drop_path_rate=0.1, **(dict(depth=2) if args.quick else {}))
        pre = Pretrainer(backbone, objective, vocab_size=args.vocab_size, cut=args.cut).to(device).train()
        if pre.two_stream:
            perm = pre.draw_perm(args.batch, device)
            ours = lambda perm=perm: (images, tokens, perm)
        else:
            mask = pre.draw_mask(args.batch, device)
            ours = lambda mask=mask: (images, tokens, None, mask)
        variants.append(Variant(objective, 'ours', False, pre, pre, ours))
        if args.compile:
            variants.append(Variant(objective, 'ours', True, pre, torch.compile(pre), ours))
        if pre.two_stream and args.reference:
            naive = NaiveTwoStream(pre)
            H = backbone.blocks[0].attn.num_heads
            prepare = lambda pre=pre, perm=perm, H=H: (
                images, tokens, perm, *naive_masks(perm, pre.cut, pre.objective, H, device))
            variants.append(Variant(objective, 'naive', False, pre, naive, prepare))
    return variants


def make_step(variant, dtype, device):
    def step(inputs=None):
        variant.pre.zero_grad(set_to_none=True)
        with training.autocast(dtype, device):
            _, loss = variant.forward(*(variant.prepare() if inputs is None else inputs))
        loss.backward()
        sync(device)
    return step


def mask_cost(variant, device, repeats):
    """Seconds per batch spent on attention masks: ours looks up the cached pair and stacks it,
    as forward_two_stream does; the naive reference builds, expands and moves its masks."""
    pre = variant.pre
    if variant.impl == 'naive':
        H = pre.backbone.blocks[0].attn.num_heads
        perm = variant.inputs[2]
        run = lambda: naive_masks(perm, pre.cut, pre.objective, H, device)
    else:
        def run():
            content, query = build_masks(pre.objective, pre.num_patches, pre.cut, device)
            return torch.cat([content, query])
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_in_turns(variants, steps, peak, args):
    """Time every variant's step `repeats` times, one step of each (and one matmul) per round, so
    all see the same load; fills v.times and returns the matmul peaks (FLOP/s)."""
    for v in variants:
        v.inputs, v.times = v.prepare(), []
        if v.compiled:  # the first call compiles: time it apart, never inside a timed step
            start = time.perf_counter()
            steps[v.name](v.inputs)
            print(f'compiled {v.name} in {time.perf_counter() - start:.0f} s')
    for _ in range(args.warmup):
        peak()
        for v in variants:
            steps[v.name](v.inputs)
    peaks = []
    for _ in range(args.repeats):
        peaks.append(peak())
        for v in variants:
            start = time.perf_counter()
            steps[v.name](v.inputs)
            v.times.append(time.perf_counter() - start)
    return peaks


def count_flops(step, variant):
    """FLOPs of one forward+backward step, and the attention backend its SDPA calls used."""
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        step()
    ops = {str(op).split('.default')[0] for op in counter.get_flop_counts().get('Global', {})}
    if variant.impl == 'naive':
        backend = 'explicit softmax'
    else:
        backend = next((SDPA_BACKENDS[op] for op in ops if op in SDPA_BACKENDS), 'math')
    return counter.get_total_flops(), backend


def best_ours(rows, objective):
    """The fastest model.py row of an objective (compiled or not)."""
    return max((r for r in rows if r['kind'] == 'step' and r['objective'] == objective and r['impl'] == 'ours'),
               key=lambda r: r['img_s'], default=None)


def ratios_and_targets(rows, device):
    """(row, text) pairs: the issue's targets for MaPeT (DESIGN "Scale and speed"), pim's ratios
    beside them for comparison."""
    by = {(r['objective'], r['impl'], r['compiled']): r for r in rows if r['kind'] == 'step'}
    out, checks = [], []
    for obj in ('pim', 'mapet'):
        ours, naive = by.get((obj, 'ours', False)), by.get((obj, 'naive', False))
        if not (ours and naive):
            continue
        ratios = [('step time, naive / ours', naive['step_ms'] / ours['step_ms'], '>=', 1.15),
                  ('peak memory, ours / naive', ours['peak_mem_mb'] / naive['peak_mem_mb'], '<=', 0.8),
                  ('mask cost per batch, naive / ours', naive['mask_ms'] / ours['mask_ms'], '>=', 100)]
        if device.type == 'cuda':
            best = best_ours(rows, obj)
            ratios.append((f'img/s, ours{" compiled" if best["compiled"] else ""} / naive',
                           best['img_s'] / naive['img_s'], '>=', 1.5))
        if obj == 'mapet':
            checks += [(f'mapet {name}', *rest) for name, *rest in ratios]
        else:
            out.append((dict(kind='ratio', objective=obj, **{name: value for name, value, *_ in ratios}),
                        f'\n{obj}: ' + ', '.join(f'{name} {value:.2f}x' for name, value, *_ in ratios)))
    mim, mapet = by.get(('mim', 'ours', False)), by.get(('mapet', 'ours', False))
    if mim and mapet:
        time_ratio = mapet['step_ms'] / mim['step_ms']
        flop_ratio = mapet['gflop_per_img'] / mim['gflop_per_img']
        out.append((dict(kind='ratio', objective='mapet/mim', step_time=time_ratio, flops=flop_ratio),
                    f'mapet / mim: step time {time_ratio:.2f}x, FLOPs {flop_ratio:.2f}x'))
        checks.append(('mapet/mim step-time ratio / FLOP ratio', time_ratio / flop_ratio, '<=', 1.05))
    for r in rows:
        if r['kind'] == 'step' and r['objective'] == 'mapet' and r['impl'] == 'ours':
            target = 0.55 if device.type == 'cpu' else 0.40      # the CPU's target; on a GPU, the H100's
            checks.append((f'mapet{" compiled" if r["compiled"] else ""} MFU', r['mfu'], '>=', target))
    if checks:
        out.append((None, '\ntargets (the issue\'s: ViT-T, batch 8, fp32 on a 2-core CPU; ViT-B bf16 '
                                       'on an H100)'))
    for name, value, op, target in checks:
        ok = value >= target if op == '>=' else value <= target
        out.append((dict(kind='target', name=name, value=value, op=op, target=target, passed=ok),
                    f'  {name:<45} {value:8.3f}  target {op} {target:<5}  {"pass" if ok else "MISS"}'))
    return out


# ----------------------------------------------------------------------------------------------
# The tokenizer's heavy parts (Sec. 4.2).


def clip_speed(args, device, repeats):
    """Images/s and dense features/s of tokenizer.clip_features on a randomly initialised CLIP
    loaded through clip_model.load (no weights are downloaded)."""
    cfg = (clip_model.CLIPConfig(vision_layers=(1, 1, 1, 1), vision_width=8, embed_dim=64,
                                 transformer_width=64, transformer_layers=1, transformer_heads=1)
           if args.quick else clip_model.CLIPConfig())                      # RN50
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'clip_random.pt')
        torch.save(clip_model.CLIP(cfg).state_dict(), path)
        model = clip_model.load(path, device)
    images = torch.randn(args.clip_batch, 3, args.clip_size, args.clip_size, device=device)
    times = []
    for i in range(repeats + 1):                                            # the first is a warm-up
        sync(device)
        start = time.perf_counter()
        tokenizer.clip_features(model, images)
        sync(device)
        times.append(time.perf_counter() - start)
    img_s = args.clip_batch / statistics.median(times[1:])
    return dict(kind='clip', model='RN50' if not args.quick else 'tiny ResNet (quick)', size=args.clip_size,
                batch=args.clip_batch, img_s=img_s, features_s=img_s * (args.clip_size // 32) ** 2)


def kmeans_speed(args, device, repeats):
    """Seconds for one Lloyd iteration of tokenizer.kmeans over kmeans_points points: one full
    assignment + accumulation pass (kmeans with iters=0; the K x C centroid update is negligible),
    run on kmeans_sample of them and scaled linearly in the number of points."""
    n, C, K = args.kmeans_sample, args.kmeans_dim, args.kmeans_k
    x = torch.randn(n, C, device=device)
    centroids = torch.randn(K, C, device=device)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        tokenizer.kmeans(x, K, iters=0, init=centroids)
        sync(device)
        times.append(time.perf_counter() - start)
    measured = statistics.median(times)
    return dict(kind='kmeans', points=args.kmeans_points, dim=C, k=K, measured_points=n, measured_s=measured,
                iteration_s=measured * args.kmeans_points / n, extrapolated=n != args.kmeans_points,
                tflop_s=2 * n * C * K / measured / 1e12)


# ----------------------------------------------------------------------------------------------
# The command.


def get_args_parser():
    p = argparse.ArgumentParser('bench', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group('model and step')
    g.add_argument('--model', choices=list(MODEL_CONFIGS),
                   help='ViT size (default: tiny on a CPU, base on a GPU; the paper: tiny/small/base)')
    g.add_argument('--batch', type=int, help='images per step (default: 8 on a CPU, 128 on a GPU; the paper: '
                   '2048 over 16-64 GPUs)')
    g.add_argument('--dtype', default='auto', help='auto (bf16 on Ampere+, fp16 on older GPUs, fp32 on a CPU), '
                   'bfloat16, float16 or float32')
    g.add_argument('--vocab-size', type=int, default=8192, help='visual-token vocabulary (paper: 8192)')
    g.add_argument('--cut', type=int, help='visible patches of pim/mapet (default round(0.3 N): 59 of 196, Tab. 6)')
    g.add_argument('--objectives', nargs='+', default=list(OBJECTIVES), choices=OBJECTIVES,
                   help='objectives to time (default: all four)')
    g.add_argument('--reference', action=argparse.BooleanOptionalAction, default=True,
                   help='also time the naive two-stream reference for pim/mapet')
    g.add_argument('--compile', action='store_true', help='also time torch.compile of each objective '
                   '(minutes of compilation per objective)')
    g = p.add_argument_group('measurement')
    g.add_argument('--device', default='cpu', help='cpu or cuda (or cuda:N)')
    g.add_argument('--threads', type=int, help='CPU threads for torch (default: torch\'s own choice)')
    g.add_argument('--repeats', type=int, help='timed steps per variant, taken in turns (default 10; 2 quick)')
    g.add_argument('--warmup', type=int, help='untimed steps per variant first (default 2; 0 quick)')
    g.add_argument('--matmul-size', type=int, help='n of the n x n x n matmul that measures the peak '
                   '(default 2048 on a CPU, 8192 on a GPU)')
    g.add_argument('--profile', action='store_true', help='print torch.profiler\'s top ops of one step per variant')
    g.add_argument('--seed', type=int, default=0, help='seed of the weights and inputs')
    g = p.add_argument_group('tokenizer (Sec. 4.2)')
    g.add_argument('--tokenizer', action=argparse.BooleanOptionalAction, default=True,
                   help='also time CLIP dense features and one k-means iteration')
    g.add_argument('--clip-size', type=int, help='CLIP input size (default 448: a 14x14 layer4 grid)')
    g.add_argument('--clip-batch', type=int, help='images per CLIP call (default 4 on a CPU, 64 on a GPU)')
    g.add_argument('--kmeans-points', type=int, help='points of the k-means iteration reported (default 1M)')
    g.add_argument('--kmeans-dim', type=int, help='feature dim C (default 2048: RN50 layer4)')
    g.add_argument('--kmeans-k', type=int, help='centroids K (default 8192, the paper\'s vocabulary)')
    g.add_argument('--kmeans-sample', type=int, help='points actually run, the time scaled to --kmeans-points '
                   '(default: all on a GPU, 8192 on a CPU)')
    g = p.add_argument_group('output')
    g.add_argument('--quick', action='store_true', help='a smoke test: micro ViT of depth 2, batch 2, 2 repeats, tiny '
                   'tokenizer sizes (a few seconds)')
    g.add_argument('--json', help='also write every row as a JSON line to this file')
    return p


def resolve_args(args):
    """Fill the defaults that depend on the device and on --quick; reject bad values."""
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        raise SystemExit(f'--device {args.device}: no CUDA device is visible; use --device cpu')
    if not args.device.startswith(('cpu', 'cuda')):
        raise SystemExit(f'--device {args.device}: use cpu or cuda')
    gpu, q = args.device.startswith('cuda'), args.quick
    defaults = dict(model='micro' if q else 'base' if gpu else 'tiny', batch=2 if q else 128 if gpu else 8,
                    repeats=2 if q else 10, warmup=0 if q else 2, matmul_size=256 if q else 8192 if gpu else 2048,
                    clip_size=64 if q else 448, clip_batch=1 if q else 64 if gpu else 4,
                    kmeans_points=1024 if q else 1_000_000, kmeans_dim=32 if q else 2048, kmeans_k=64 if q else 8192)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.kmeans_sample is None:
        args.kmeans_sample = args.kmeans_points if gpu or q else min(args.kmeans_points, 8192)
    for name in ('batch', 'repeats', 'matmul_size', 'clip_batch', 'kmeans_points', 'kmeans_dim', 'kmeans_k',
                 'kmeans_sample', 'vocab_size'):
        if getattr(args, name) < 1:
            raise SystemExit(f'--{name.replace("_", "-")} must be at least 1, got {getattr(args, name)}')
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        raise SystemExit('--warmup must be >= 0 and --threads >= 1')
    if args.clip_size % 32:
        raise SystemExit(f'--clip-size {args.clip_size}: must be a multiple of 32 (CLIP layer4 has stride 32)')
    if args.kmeans_sample > args.kmeans_points or args.kmeans_k > args.kmeans_sample:
        raise SystemExit('need --kmeans-k <= --kmeans-sample <= --kmeans-points')
    return args


def machine_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or 'CPU'
    with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:
        cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
    return f'{cpu}, {torch.get_num_threads()} threads'


def main(argv=None):
    args = resolve_args(get_args_parser().parse_args(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = training.resolve_dtype(args.dtype, device)
    rows = []

    def emit(row, text=None):
        if row is not None:
            rows.append(row)
        if text:
            print(text)

    dtype_name = str(dtype).replace('torch.', '')
    cfg = MODEL_CONFIGS[args.model]
    emit(dict(kind='machine', device=machine_name(device), torch=torch.__version__, model=args.model,
              batch=args.batch, dtype=dtype_name, img_size=cfg['img_size']),
         f'bench: {machine_name(device)}, torch {torch.__version__}; ViT-{args.model} {cfg["img_size"]} px, '
         f'batch {args.batch}, {dtype_name}, vocabulary {args.vocab_size}, {args.repeats} timed steps per variant')

    torch.manual_seed(args.seed)
    images = torch.randn(args.batch, 3, cfg['img_size'], cfg['img_size'], device=device)
    tokens = torch.randint(args.vocab_size, (args.batch, (cfg['img_size'] // cfg['patch_size']) ** 2), device=device)
    variants = make_variants(args, device, images, tokens)
    peak = matmul_sample(args.matmul_size, dtype, device, calls=1 if device.type == 'cpu' else 20)
    steps = {v.name: make_step(v, dtype, device) for v in variants}

    peaks = time_in_turns(variants, steps, peak, args)
    peak_flops = statistics.median(peaks)
    emit(dict(kind='matmul', n=args.matmul_size, dtype=dtype_name, tflop_s=peak_flops / 1e12,
              spread=(max(peaks) - min(peaks)) / peak_flops),
         f'matmul peak: {peak_flops / 1e9:.1f} GFLOP/s ({args.matmul_size}^3 {dtype_name} torch.mm, median of '
         f'{len(peaks)}, min {min(peaks) / 1e9:.1f}, max {max(peaks) / 1e9:.1f})')

    header = (f'{"variant":<22} {"step ms":>9} {"±IQR":>6} {"img/s":>8} {"mem MB":>8} {"GFLOP/img":>9} '
              f'{"GFLOP/s":>8} {"MFU":>6} {"mask ms":>8}  attention')
    print(header)
    flops = {}
    for v in variants:
        step = steps[v.name]
        if v.compiled:  # FlopCounterMode cannot see inside a compiled graph: the eager count is the same work
            total, backend = flops[(v.objective, v.impl)][0], 'compiled ' + flops[(v.objective, v.impl)][1]
        else:
            total, backend = count_flops(lambda: step(v.inputs), v)
            flops[(v.objective, v.impl)] = (total, backend)
        v.pre.zero_grad(set_to_none=True)             # the step's gradients count as its memory
        memory = step_memory(step, device)                                  # prepares its own inputs
        mask_s = mask_cost(v, device, repeats=5 if v.impl == 'naive' else 200) if v.pre.two_stream else None
        median, iqr = median_iqr(v.times)
        row = dict(kind='step', objective=v.objective, impl=v.impl, compiled=v.compiled, model=args.model,
                   batch=args.batch, dtype=dtype_name, device=device.type, step_ms=median * 1e3, iqr_ms=iqr * 1e3,
                   img_s=args.batch / median, peak_mem_mb=memory / 2 ** 20, gflop_per_img=total / args.batch / 1e9,
                   tflop_s=total / median / 1e12, mfu=total / median / peak_flops,
                   mask_ms=None if mask_s is None else mask_s * 1e3,
                   sdpa=backend, repeats=len(v.times))
        emit(row, f'{v.name:<22} {row["step_ms"]:9.1f} {row["iqr_ms"]:6.0f} {row["img_s"]:8.2f} '
                  f'{row["peak_mem_mb"]:8.0f} {row["gflop_per_img"]:9.2f} {row["tflop_s"] * 1e3:8.1f} '
                  f'{row["mfu"]:6.1%} {"-" if mask_s is None else f"{mask_s * 1e3:.3f}":>8}  {backend}')
    if args.profile:
        for v in variants:
            print(f'\ntorch.profiler, one step of {v.name}:')
            print(top_ops(lambda: steps[v.name](v.inputs), device))

    mapet = next((r for r in rows if r['kind'] == 'step' and r['objective'] == 'mapet'
                  and r['impl'] == 'ours' and not r['compiled']), None)
    for row, text in ratios_and_targets(rows, device):
        emit(row, text)

    if device.type == 'cuda' and mapet:
        best = best_ours(rows, 'mapet')
        hours = PAPER_EPOCHS * IMAGENET_TRAIN / (8 * best['img_s']) / 3600
        paper_gpus, paper_days = PAPER_GPU_DAYS
        note = '' if args.model == 'base' else f' (measured on ViT-{args.model}; run --model base for the paper\'s ViT-B)'
        emit(dict(kind='estimate', model=args.model, gpus=8, img_s_per_gpu=best['img_s'], hours=hours,
                  paper_gpus=paper_gpus, paper_hours=paper_days * 24),
             f'\nthe paper\'s run (MaPeT, {PAPER_EPOCHS} epochs of ImageNet-1k) on 8 x {machine_name(device)}: '
             f'~{hours:.0f} h at {best["img_s"]:.0f} img/s per GPU, perfect scaling{note}; paper: ~{paper_days:.0f} '
             f'day on {paper_gpus} V100s')

    if args.tokenizer:
        repeats = 2 if args.quick else 3
        clip = clip_speed(args, device, repeats)
        emit(clip, f'\ntokenizer: CLIP {clip["model"]} at {clip["size"]} px: {clip["img_s"]:.2f} img/s, '
                   f'{clip["features_s"]:.0f} dense features/s (batch {clip["batch"]})')
        km = kmeans_speed(args, device, repeats)
        label = f', EXTRAPOLATED from {km["measured_points"]} points' if km['extrapolated'] else ''
        emit(km, f'tokenizer: one k-means iteration, {km["points"]} x {km["dim"]} points, K = {km["k"]}: '
                 f'{km["iteration_s"]:.2f} s ({km["tflop_s"] * 1e3:.1f} GFLOP/s{label})')

    if args.json:
        with open(args.json, 'w') as f:
            for row in rows:
                f.write(json.dumps(row) + '\n')
    return rows


if __name__ == '__main__':
    main()
