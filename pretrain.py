"""Pre-train a ViT to predict the visual tokens of its patches: MIM, BEiT, PIM, MaPeT or CAE.

Paper: Sec. 3 (MIM, PIM), Sec. 4.1 (MaPeT), Sec. 5.1 and Tab. 7 (the recipe: PAPER below and the
flags' defaults). The objectives and the two-stream ViT are in model.py; this is the loop.

    python pretrain.py --objective mapet  # demo: micro ViT, 32 px images, ~4 min on 2 CPUs
    torchrun --nproc_per_node=8 pretrain.py --objective mapet --model base --data /path/imagenet \\
        --tokens tokens/in1k_rn50x64 --accum 4  # ViT-B, batch 2048 = 8 GPUs x 4 x 64
    python pretrain.py --data synthetic --model base --steps 50  # throughput, no dataset

Writes to --out: ckpt.pt (every --save-every steps; --resume continues it bit for bit),
backbone.pt (the ViT for finetune.py and probe.py; timm's loads it strictly), log.jsonl, args.json.

Tokens come from tokenizer.py (row i = image i; the demo's are made on the first run). A sample's
colour jitter (key 0), permutation or mask (key 1) and drop path (key 2) are drawn from
data.seed_for(--seed, epoch, image index, key): any process count, --accum or resume agree.
With a decoded-image cache (data.py) beside the tokens, the jitter runs on the device instead.
"""
import argparse
import functools
import math
import os
import time

import torch
from torchvision import transforms
from tqdm import tqdm

import data
import model
import tokenizer
import training
from training import print0

# Per --data: the paper's defaults (Tab. 7), or the demo's (learns visibly on 2 CPUs).
PAPER = dict(model='base', epochs=300, batch_size=2048, lr=1.5e-3, warmup_epochs=10,
             workers=training.default_workers(), tokens=None, save_every=500, log_every=50)
DEMO = dict(model='micro', epochs=10, batch_size=128, lr=3.2e-2, warmup_epochs=0.5, workers=0,
            tokens=data.DEMO_TOKENS, save_every=100, log_every=10)
WARMUP_LR = 1e-6  # Tab. 7
BETAS, EPS = (0.9, 0.999), 1e-8  # Tab. 7: AdamW
POSITIVE = ('epochs', 'batch_size', 'accum', 'lr', 'save_every', 'log_every', 'steps')
RANGES = [(key, 0, math.inf) for key in ('clip_grad', 'warmup_epochs', 'min_lr', 'weight_decay',
                                         'color_jitter', 'workers')] + [('drop_path', 0, 0.99)]
SAME_RUN = ('model', 'objective', 'data', 'batch_size', 'cut', 'mask_ratio')  # for --resume


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0] + ' (Sec. 3-5.1, Tab. 7)')
    paper = ('model', 'epochs', 'batch_size', 'lr', 'warmup_epochs')  # Tab. 7; others: practical

    def default(key):
        return f'[{"paper" if key in paper else "default"}: {PAPER[key]}; demo: {DEMO[key]}]'
    g = p.add_argument_group('objective and model')
    g.add_argument('--objective', default='mapet', choices=model.OBJECTIVES,
                   help='mim, beit (block mask), pim, mapet (the paper\'s), cae [mapet]')
    g.add_argument('--model', choices=list(model.MODEL_CONFIGS), help=default('model'))
    g.add_argument('--cut', type=int, help='pim/mapet: visible patches [0.3 N, Tab. 6]')
    g.add_argument('--mask-ratio', type=float, default=0.4, help='mim/beit: masked fraction [0.4]')
    g.add_argument('--drop-path', type=float, default=0.1, help='stochastic depth [paper: 0.1]')
    g.add_argument('--layer-scale', type=float, default=0.1, help='layer scale init [paper: 0.1]')
    g.add_argument('--grad-checkpointing', action='store_true', help='less memory, slower')
    g = p.add_argument_group('data')
    g.add_argument('--data', default='demo', help='demo | an ImageFolder root with train/ | '
                   + ' | '.join(data.TORCHVISION_DATASETS) + ' [demo]')
    g.add_argument('--data-root', default='data', help='where torchvision sets are [data]')
    g.add_argument('--tokens', help=f'tokenizer.py\'s train split dir [demo: {DEMO["tokens"]}]')
    g.add_argument('--image-cache', help='data.py\'s images.npy dir [--tokens if it has one]')
    g.add_argument('--color-jitter', type=float, default=0.4, help='the only augmentation [0.4]')
    g.add_argument('--workers', type=int, help=f'loader processes per GPU {default("workers")}')
    g = p.add_argument_group('optimisation (Tab. 7)')
    g.add_argument('--epochs', type=int, help=default('epochs'))
    g.add_argument('--batch-size', type=int, help=f'global batch {default("batch_size")}')
    g.add_argument('--accum', type=int, default=1, help='micro-batches per step [1]')
    g.add_argument('--lr', type=float, help=f'peak lr at batch 2048, scaled {default("lr")}')
    g.add_argument('--min-lr', type=float, default=1e-5, help='lr at the end of the cosine [1e-5]')
    g.add_argument('--warmup-epochs', type=float, help=f'linear {default("warmup_epochs")}')
    g.add_argument('--weight-decay', type=float, default=0.05, help='AdamW [paper: 0.05]')
    g.add_argument('--clip-grad', type=float, default=3.0, help='max gradient norm, 0 = none [3.0]')
    g.add_argument('--dtype', default='auto', choices=('auto', *training.DTYPES),
                   help='auto: bf16 on Ampere+, fp16 on older GPUs, fp32 on CPU')
    g.add_argument('--compile', action='store_true', help='torch.compile the step (GPUs)')
    g = p.add_argument_group('run')
    g.add_argument('--out', help='output directory [runs/pretrain_<objective>]')
    g.add_argument('--resume', action='store_true', help='continue the run in --out, exactly')
    g.add_argument('--seed', type=int, default=0, help='init, data order, draws [0]')
    g.add_argument('--steps', type=int, help='stop at this step; the schedule spans --epochs')
    g.add_argument('--save-every', type=int, help=f'steps between ckpts {default("save_every")}')
    g.add_argument('--log-every', type=int, help=f'steps between log lines {default("log_every")}')
    g.add_argument('--device', help='cuda | cpu | cuda:N [cuda if available]')
    return p


def resolve_args(args):
    """The defaults --data selects, checked."""
    for key, value in (DEMO if args.data == 'demo' else PAPER).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tokens is None and args.data != 'synthetic':
        raise ValueError(f'--tokens is required for --data {args.data}: run `python tokenizer.py '
                         f'--data {args.data} --split train --out DIR` first, pass --tokens DIR')
    if args.image_cache is None and os.path.isfile(f'{args.tokens}/images.npy'):
        args.image_cache = args.tokens  # data.py wrote a decoded-image cache beside the tokens
    training.check_args(args, POSITIVE, RANGES)
    if args.warmup_epochs > args.epochs:
        print0(f'warning: --warmup-epochs {args.warmup_epochs:g} is longer than the run (--epochs '
               f'{args.epochs}): the lr never reaches its peak')
    args.out = args.out or os.path.join('runs', f'pretrain_{args.objective}')
    return args


# Build: data and tokens, the ViT and its objective (Sec. 3, 4.1), AdamW.

def build_data(args, backbone):
    """(image, tokens [N]) pairs and the tokens' meta.json; images are uint8 crops, to jitter
    on the device, when they come from a decoded-image cache."""
    size, grid = backbone.patch_embed.img_size, backbone.patch_embed.grid
    if args.data == 'synthetic':
        pairs = data.SyntheticPairs(size, grid, vocab_size=8192)
        return pairs, dict(vocab_size=8192, grid=grid, features='random')
    cache = args.image_cache
    dataset = data.build_dataset(args.data, 'train', args.data_root,
                                 None if cache else pil_transform(size, args.color_jitter))
    tokens, meta = data.load_tokens(args.tokens, args.data, 'train', len(dataset), grid,
                                    patch=backbone.config['patch_size'])
    if cache:
        dataset = data.CachedImages(cache, args.data, 'train', size, dataset)
        print0(f'images from the decoded-image cache {cache}; colour jitter on the device')
    if len(dataset) < args.batch_size:
        raise ValueError(f'{args.data} has {len(dataset)} images, fewer than one --batch-size '
                         f'{args.batch_size}')
    return data.TokenizedDataset(dataset, tokens, meta.get('skipped', ())), meta


def pil_transform(size, color_jitter):
    """Sec. 5.1: the tokenizer's crop, then colour jitter only: patch (i, j) is where token (i, j)
    is. Per image on a loader core; a decoded-image cache jitters on the device instead."""
    jitter = [transforms.ColorJitter(*[color_jitter] * 3)] if color_jitter > 0 else []
    return transforms.Compose([data.pretrain_geometry(size), *jitter, transforms.ToTensor(),
                               transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])


def build(args, d):
    """(ckpt or None, Pretrainer, keyed set, meta, optimizer, scaler); --resume restores them."""
    ckpt_path = os.path.join(args.out, 'ckpt.pt')
    ckpt = training.resume_or_start(args, ckpt_path, SAME_RUN)
    if args.data == 'demo':
        tokenizer.ensure_demo_tokens(args.tokens, 'train', d.device)
    training.seed_everything(args.seed, d.rank)  # after the tokenizer, which draws from the streams
    # No head and fc_norm frozen: DDP waits for no gradient that never comes.
    backbone = model.create_model(args.model, num_classes=0, drop_path_rate=args.drop_path,
                                  layer_scale=args.layer_scale)
    backbone.fc_norm.requires_grad_(False)
    backbone.grad_checkpointing = args.grad_checkpointing
    pairs, meta = build_data(args, backbone)
    pre = model.Pretrainer(backbone, args.objective, vocab_size=meta['vocab_size'], cut=args.cut,
                           mask_ratio=args.mask_ratio).to(d.device)
    dataset = data.KeyedSet(pairs, args.seed, sample_draws(pre, args))
    optimizer = torch.optim.AdamW(training.param_groups(pre, args.weight_decay), lr=0.0,
                                  betas=BETAS, eps=EPS, fused=d.device.type == 'cuda')
    scaler = training.grad_scaler(training.resolve_dtype(args.dtype, d.device), d.device)
    if ckpt is not None:
        try:
            pre.load_state_dict(ckpt['model'])
        except RuntimeError as e:  # e.g. a token file of another vocabulary since
            cause = str(e).splitlines()[1].strip()
            raise ValueError(f'{ckpt_path} does not fit this model ({cause}): were the --tokens '
                             'changed? pass that run\'s --tokens') from None
        optimizer.load_state_dict(ckpt['optimizer'])
        scaler.load_state_dict(ckpt['scaler'])
    return ckpt, pre, dataset, meta, optimizer, scaler


def sample_draws(pre, args):
    """(key, draw) of each sample's randomness, drawn in the loader's workers (data.KeyedSet):
    its permutation or mask (key 1), drop path (key 2) and, for the uint8 crops of a cache, its
    colour jitter (key 0: the key under which the PIL path's ColorJitter draws, so the same)."""
    jitter = functools.partial(data.draw_jitter, strength=args.color_jitter)
    return [(1, pre.draw_perm if pre.two_stream else pre.draw_mask), (2, pre.draw_drop)] + (
        [(0, jitter)] if args.image_cache or args.data == 'synthetic' else [])


def main(argv=None):
    return training.run_command('pretrain.py', get_args_parser(), resolve_args, train, argv)


def train(args, d):
    device, out = d.device, args.out
    try:
        ckpt, pre, dataset, meta, optimizer, scaler = build(args, d)
    except ValueError as e:
        raise SystemExit(f'pretrain.py: {e}') from None
    s, batch_line = training.plan(args, len(dataset), d, 2048, WARMUP_LR)  # Tab. 7: lr at 2048
    start = ckpt['step'] if ckpt else 0
    if start >= s.last:
        return finished(ckpt, s, out)
    training.start_run(args, out, d)
    dtype, skipped = training.resolve_dtype(args.dtype, device), len(meta.get('skipped', ()))
    million = sum(p.numel() for p in pre.backbone.parameters()) / 1e6
    targets = pre.num_patches - pre.cut if pre.two_stream else pre.num_masked
    print0(f'{args.objective} on a {args.model} ViT ({million:.1f}M parameters), {len(dataset)} '
           f'images{f" ({skipped} unreadable, skipped)" if skipped else ""}, tokens {meta["grid"]}x'
           f'{meta["grid"]} of {meta["vocab_size"]} ({meta.get("features")}), {targets} targets of '
           f'{pre.num_patches} patches')
    print0(f'{batch_line}; {str(dtype).replace("torch.", "")}')
    if start:
        print0(f'resumed {out}/ckpt.pt at step {start} (epoch {start / s.steps_per_epoch:.2f})')
    ddp = training.wrap_ddp(pre, d)
    step_model = torch.compile(ddp or pre) if args.compile else ddp or pre  # ckpts: from `pre`
    loader = training.train_loader(dataset, d, args.seed, s, args.accum, args.workers)
    bar = tqdm(total=s.last, initial=start, disable=not d.is_main,
               desc=f'pretrain {args.objective}', dynamic_ncols=True)
    window, epoch, overflows, final = training.Meter(), training.Meter(), 0, None
    pre.train()
    start_time = time.time()
    for step, micro_batches in training.steps(loader, start, s, args.accum, ddp, 'pretrain.py'):
        lr = training.set_lr(optimizer, s, step)
        stats = torch.zeros(4, dtype=torch.float64, device=device)  # loss, micro-batches, hits, M
        for _, _, images, tokens, corrupt, drop, *jitter in micro_batches:
            images, tokens, corrupt, drop, *jitter = (t.to(device, non_blocking=True) for t in (
                images, tokens, corrupt, drop, *jitter))
            if jitter:  # uint8 crops from the image cache: jittered here, batched
                images = data.color_jitter(images, jitter[0])
            corrupt = dict(perm=corrupt) if pre.two_stream else dict(mask=corrupt)
            with training.autocast(dtype, device):
                logits, loss = step_model(images, tokens, **corrupt, drop_draws=drop)  # (B, M, K)
            scaler.scale(loss / args.accum).backward()
            targets = pre.targets_for(tokens, **corrupt)  # (B, M)
            stats += torch.stack([loss.detach().double(), stats.new_tensor(1.0),
                                  (logits.argmax(-1) == targets).sum().double(),
                                  stats.new_tensor(targets.numel())])
        loss, sums, grad_norm, overflow = training.finish_step(
            stats, optimizer, scaler, args.clip_grad, step, 'pretrain.py', f'{out}/ckpt.pt')
        done, acc, overflows = step + 1, sums[2] / sums[3], overflows + overflow
        window.add(loss=loss, token_acc=acc, grad_norm=grad_norm)
        epoch.add(loss=loss, token_acc=acc)
        bar.update()
        if done % args.log_every == 0 or done == s.last:
            mean, n, seconds = final = window.read()
            training.log_line(
                f'{out}/log.jsonl', step=done, epoch=round(done / s.steps_per_epoch, 4), **mean,
                lr=lr, img_per_s=n * args.batch_size / seconds, peak_mem_mb=training.peak_memory_mb(
                    device), **(dict(skipped_steps=overflows) if scaler.is_enabled() else {}))
            bar.set_postfix(loss=f'{mean["loss"]:.3f}', acc=f'{mean["token_acc"]:.3f}')
        if done % s.steps_per_epoch == 0 and d.is_main:
            mean, n, _ = epoch.read()
            since = '' if n == s.steps_per_epoch else f' ({n} steps since resume)'
            tqdm.write(f'epoch {done // s.steps_per_epoch}/{args.epochs}: loss {mean["loss"]:.4f}, '
                       f'token accuracy {mean["token_acc"]:.2%}, lr {lr:.2e}{since}')
        if (done % args.save_every == 0 or done == s.last) and d.is_main:
            training.save_checkpoint(f'{out}/ckpt.pt', dict(
                model=pre.state_dict(), config=dict(pre.backbone.config), objective=args.objective,
                optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=done, loss=loss,
                token_acc=acc, args=vars(args), tokens=token_info(args, meta)))
    bar.close()
    return summary(args, pre, meta, s, start, final, overflows, time.time() - start_time, d)


def token_info(args, meta):
    return dict(dir=args.tokens and os.path.realpath(args.tokens), vocab_size=meta['vocab_size'],
                grid=meta['grid'], features=meta.get('features'))


def summary(args, pre, meta, s, start, final, overflows, seconds, d):
    """Write backbone.pt; print and return what the run reached."""
    (mean, n, _), epochs = final, s.last / s.steps_per_epoch
    img_s = (s.last - start) * args.batch_size / seconds
    if d.is_main:
        training.save_backbone(f'{args.out}/backbone.pt', pre.backbone, dict(
            objective=args.objective, epochs=round(epochs, 4), step=s.last, args=vars(args),
            tokens=token_info(args, meta)))
    print0(f'done: {epochs:.2f} epochs, {s.last} steps, final loss {mean["loss"]:.4f}, token '
           f'accuracy {mean["token_acc"]:.2%} (mean of the last {n} steps), {seconds:.0f} s, '
           f'{img_s:.0f} img/s -> {args.out}/ckpt.pt, {args.out}/backbone.pt')
    return dict(step=s.last, epochs=epochs, loss=mean['loss'], token_acc=mean['token_acc'],
                seconds=seconds, img_per_s=img_s, resumed_at=start, skipped_steps=overflows)


def finished(ckpt, s, out):
    """--resume of a run at its last step: its saved numbers."""
    print0(f'{out}/ckpt.pt is a finished run (step {ckpt["step"]} of {s.last}): loss '
           f'{ckpt["loss"]:.4f}, token accuracy {ckpt["token_acc"]:.2%}; nothing written (raise '
           '--steps or --epochs)')
    return dict(step=ckpt['step'], epochs=ckpt['step'] / s.steps_per_epoch, loss=ckpt['loss'],
                token_acc=ckpt['token_acc'], resumed_at=ckpt['step'], skipped_steps=0)


if __name__ == '__main__':
    main()
