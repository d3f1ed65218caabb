"""Pre-train a ViT to predict the visual tokens of its patches: MIM, BEiT, PIM or MaPeT.

Paper: Sec. 3 (MIM, PIM), Sec. 4.1 (MaPeT), Sec. 5.1 and Tab. 7 (the recipe: AdamW, peak lr
1.5e-3 at batch 2048, cosine to 1e-5 after 10 warmup epochs, 300 epochs, weight decay 0.05,
grad clip 3.0, drop path 0.1, layer scale 0.1, colour jitter 0.4 as the only augmentation).
The objectives and the two-stream ViT are in model.py; this file is the training loop.

    python pretrain.py --objective mapet        # demo: micro ViT, built-in 32 px images, ~4 min on 2 CPUs
    python pretrain.py --objective mapet --resume                       # continue runs/pretrain_mapet
    torchrun --nproc_per_node=8 pretrain.py --objective mapet --model base --data /path/imagenet \\
        --tokens tokens/in1k_rn50x64 --accum 4                          # ViT-B, batch 2048 = 8 GPUs x 4 x 64
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 pretrain.py \\
        --objective mapet --model base --data /path/imagenet --tokens tokens/in1k_rn50x64 --accum 2

Writes to --out (default runs/pretrain_<objective>): ckpt.pt (model, optimizer, loss scaler, step,
every rank's RNG state, args; rewritten atomically every --save-every steps; --resume continues it
bit for bit), backbone.pt (the ViT alone, read by finetune.py and probe.py), log.jsonl, args.json.

Tokens come from tokenizer.py (row i = dataset index i); for --data demo they are made on the first
run (k-means on raw pixels). Every random choice a sample meets, its colour jitter and its
permutation or mask, is drawn from a seed that depends only on (--seed, epoch, image index): a
sample is corrupted the same way whatever the number of processes, the accumulation or a resume,
so those runs compute the same thing (tests/test_pretrain.py checks it).

Shape letters: B batch, N patches, M targets, K vocabulary, G grid side.
"""
import argparse
import contextlib
import math
import os
import resource
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torchvision import transforms
from tqdm import tqdm

import data
import model
import tokenizer
import training
from training import print0

# The defaults that --data selects: the paper's (Tab. 7), or the demo's, sized so the micro ViT
# learns visibly on two CPU cores in a few minutes.
PAPER = dict(model='base', epochs=300, batch_size=2048, lr=1.5e-3, warmup_epochs=10, workers=10, tokens=None,
             save_every=500, log_every=50)
DEMO = dict(model='micro', epochs=3, batch_size=128, lr=3.2e-2, warmup_epochs=0.5, workers=0,
            tokens=data.DEMO_TOKENS, save_every=100, log_every=10)
WARMUP_LR = 1e-6                   # Tab. 7: the warmup starts from 1e-6
BETAS, EPS = (0.9, 0.999), 1e-8    # Tab. 7: AdamW


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0] + ' (paper Sec. 3-5.1, Tab. 7)')
    paper = ('model', 'epochs', 'batch_size', 'lr', 'warmup_epochs')  # Tab. 7; the others are practical choices
    default = lambda key: f'[{"paper" if key in paper else "default"}: {PAPER[key]}; --data demo: {DEMO[key]}]'
    g = p.add_argument_group('objective and model')
    g.add_argument('--objective', default='mapet', choices=model.OBJECTIVES,
                   help='mim: random patches masked; beit: block-wise masking; pim: permuted, two-stream; '
                   'mapet: pim + position-aware mask tokens, the paper\'s method [mapet]')
    g.add_argument('--model', default=None, choices=list(model.MODEL_CONFIGS),
                   help=f'ViT size: tiny/small/base: 224 px, patch 16; micro: the 32 px CPU size {default("model")}')
    g.add_argument('--cut', type=int, default=None, help='pim/mapet: visible patches, CLS excluded (paper c = '
                   'cut + 1); default round(0.3 N): 59 of 196, the best of Tab. 6 (c = 60)')
    g.add_argument('--mask-ratio', type=float, default=0.4, help='mim/beit: fraction of patches masked '
                   '(BEiT: 75 of 196) [0.4]')
    g.add_argument('--drop-path', type=float, default=0.1, help='stochastic depth rate [paper: 0.1]')
    g.add_argument('--layer-scale', type=float, default=0.1, help='layer scale initial value [paper: 0.1]')
    g.add_argument('--grad-checkpointing', action='store_true', help='recompute activations in backward: less '
                   'memory for a slower step (ViT-B MaPeT at 64 images on a 32 GB GPU)')
    g = p.add_argument_group('data')
    g.add_argument('--data', default='demo', help='demo | an ImageFolder root with train/ (ImageNet) | '
                   + ' | '.join(data.TORCHVISION_DATASETS) + ' [demo]')
    g.add_argument('--data-root', default='data', help='where torchvision datasets are (downloaded) [data]')
    g.add_argument('--tokens', default=None, help='token directory tokenizer.py wrote for this dataset\'s train split '
                   f'[required; --data demo: {DEMO["tokens"]}, made on the first run]')
    g.add_argument('--color-jitter', type=float, default=0.4, help='brightness/contrast/saturation jitter, the only '
                   'augmentation: patches must stay where their tokens were computed (Sec. 5.1) [paper: 0.4]')
    g.add_argument('--workers', type=int, default=None, help=f'data loader processes per GPU {default("workers")}')
    g = p.add_argument_group('optimisation (Tab. 7)')
    g.add_argument('--epochs', type=int, default=None, help=f'epochs {default("epochs")}')
    g.add_argument('--batch-size', type=int, default=None, help='global batch; each process takes batch / '
                   f'(processes x accum) per forward pass {default("batch_size")}')
    g.add_argument('--accum', type=int, default=1, help='gradient accumulation steps: batch 2048 on 8 GPUs of 64 '
                   'images is --accum 4 [1]')
    g.add_argument('--lr', type=float, default=None, help='peak learning rate at batch 2048, scaled linearly to '
                   f'--batch-size (the demo\'s is 2e-3 at its batch 128) {default("lr")}')
    g.add_argument('--min-lr', type=float, default=1e-5, help='learning rate at the end of the cosine [paper: 1e-5]')
    g.add_argument('--warmup-epochs', type=float, default=None, help='linear warmup from 1e-6, per step '
                   f'{default("warmup_epochs")}')
    g.add_argument('--weight-decay', type=float, default=0.05, help='AdamW weight decay, none on biases, norms, '
                   'tokens, layer scale [paper: 0.05]')
    g.add_argument('--clip-grad', type=float, default=3.0, help='max gradient norm, 0 = no clipping [paper: 3.0]')
    g.add_argument('--dtype', default='auto', choices=('auto', 'bfloat16', 'float16', 'float32'),
                   help='auto: bfloat16 on Ampere and later GPUs, float16 with loss scaling on older ones (V100), '
                   'float32 on CPU [auto]')
    g.add_argument('--compile', action='store_true', help='torch.compile the training step (GPUs; slow first step)')
    g = p.add_argument_group('run')
    g.add_argument('--out', default=None, help='output directory [runs/pretrain_<objective>]')
    g.add_argument('--resume', action='store_true', help='continue the run in --out from its ckpt.pt, exactly')
    g.add_argument('--seed', type=int, default=0, help='seeds the initialisation, data order and every draw [0]')
    g.add_argument('--steps', type=int, default=None, help='stop after this many optimizer steps in all, the schedule '
                   'still spanning --epochs: for smoke tests, or to split a long run into jobs')
    g.add_argument('--save-every', type=int, default=None, help=f'steps between checkpoints {default("save_every")}')
    g.add_argument('--log-every', type=int, default=None, help=f'steps between log.jsonl lines {default("log_every")}')
    return p


def resolve_args(args):
    """Fill the defaults that --data selects and check ranges; raises ValueError."""
    for key, value in (DEMO if args.data == 'demo' else PAPER).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tokens is None:
        raise ValueError(f'--tokens is required for --data {args.data}: run `python tokenizer.py --data {args.data} '
                         '--split train --out DIR` first and pass --tokens DIR')
    args.out = args.out or os.path.join('runs', f'pretrain_{args.objective}')
    for key in ('epochs', 'batch_size', 'accum', 'lr', 'save_every', 'log_every', 'steps'):
        value = getattr(args, key)
        if value is not None and not value > 0:
            raise ValueError(f'--{key.replace("_", "-")} must be positive, got {value}')
    return args


# ----------------------------------------------------------------------------------------------
# Data. The loader is asked for (epoch, index) keys, so every random draw can depend on them.


class PretrainSet(data.SeededSet):
    """(epoch, index, image, tokens [N]) for the key (epoch, index) of a TokenizedDataset: the key
    travels with the sample, so the step can draw its permutation or mask from it."""

    def __getitem__(self, key):
        item = super().__getitem__(key)
        return None if item is None else (*key, *item)


def draw_corruption(pre, epochs, indices, seed):
    """Each sample's permutation (pim, mapet: (B, N)) or mask (mim, beit: (B, N) bool), drawn by
    the Pretrainer from seed_for(seed, epoch, index, 1): independent of how a batch is split."""
    rows = []
    with torch.random.fork_rng(devices=[]):
        for epoch, i in zip(epochs.tolist(), indices.tolist()):
            torch.random.default_generator.manual_seed(data.seed_for(seed, epoch, i, 1))
            rows.append(pre.draw_perm(1) if pre.two_stream else pre.draw_mask(1))
    return torch.cat(rows)


def build_data(args, img_size, grid):
    """(dataset, memory-mapped tokens, their meta), checked against each other."""
    # Sec. 5.1: the tokenizer's crop, then colour jitter only, so patch (i, j) is where token (i, j) was.
    jitter = [transforms.ColorJitter(*[args.color_jitter] * 3)] if args.color_jitter > 0 else []
    transform = transforms.Compose([data.pretrain_geometry(img_size), *jitter, transforms.ToTensor(),
                                    transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)])
    dataset = data.build_dataset(args.data, 'train', args.data_root, transform)
    tokens, meta = data.load_tokens(args.tokens, args.data, 'train', len(dataset), grid)
    if len(dataset) < args.batch_size:
        raise ValueError(f'{args.data} has {len(dataset)} images, fewer than one --batch-size {args.batch_size}')
    return dataset, tokens, meta


# ----------------------------------------------------------------------------------------------
# Checkpoints.


def check_resume(ckpt, args, path):
    """Refuse to continue a run of another model size, objective, dataset or global batch."""
    was = ckpt['args']
    for key in ('model', 'objective', 'data', 'batch_size', 'cut', 'mask_ratio'):
        if was[key] != getattr(args, key):
            flag = '--' + key.replace('_', '-')
            run = f'{was["objective"]} run of --model {was["model"]}'
            run += '' if key in ('model', 'objective') else f' with {flag} {was[key]}'
            raise ValueError(f'{path} is a {run}; this run asks for {flag} {getattr(args, key)}: pass {flag} '
                             f'{was[key]} to continue it, or another --out to start a new run')
    training.report_changed_settings(was, args)


def restore(ckpt, path, pre, optimizer, scaler, d):
    """Load a ckpt.pt into the model, optimizer and scaler, and this rank's RNG state; its step."""
    try:
        pre.load_state_dict(ckpt['model'])
    except RuntimeError as e:  # e.g. a token file of another vocabulary since
        raise ValueError(f'{path} does not fit this model ({str(e).splitlines()[1].strip()}): were the '
                         '--tokens changed? pass the token directory of that run') from None
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    training.restore_rng_state(ckpt, d, 'drop path')
    return ckpt['step'], ckpt['loss'], ckpt['token_acc']


def save(path, pre, optimizer, scaler, step, loss, acc, args, meta, d):
    rng = training.all_rng_states()  # every rank takes part; rank 0 writes
    if d.is_main:
        training.save_checkpoint(path, dict(
            model=pre.state_dict(), config=dict(pre.backbone.config), objective=args.objective,
            optimizer=optimizer.state_dict(),
            scaler=scaler.state_dict(), step=step, loss=loss, token_acc=acc, args=vars(args), rng=rng,
            tokens=token_info(args, meta)))


def token_info(args, meta):
    return dict(dir=os.path.realpath(args.tokens), vocab_size=meta['vocab_size'], grid=meta['grid'],
                features=meta.get('features'))


# ----------------------------------------------------------------------------------------------
# The training step and the command.


def train_step(step_model, pre, ddp, batches, optimizer, scaler, args, dtype, device, step):
    """One optimizer step over `accum` micro-batches: (loss, token accuracy, grad norm, skipped).

    The loss and accuracy are all-reduced, so every rank sees the same numbers and a non-finite
    loss stops every rank at the same step, before the optimizer touches the weights.
    """
    stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct tokens, predicted tokens
    for k in range(args.accum):
        batch = next(batches)
        if batch is None:
            raise SystemExit(f'pretrain.py: every image of a batch at step {step + 1} is unreadable')
        epochs, index, images, tokens = batch
        images, tokens = images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
        drawn = draw_corruption(pre, epochs, index, args.seed).to(device, non_blocking=True)
        kw = dict(perm=drawn) if pre.two_stream else dict(mask=drawn)
        # DDP all-reduces the gradients during backward: only the last micro-batch needs it.
        sync = ddp.no_sync() if ddp is not None and k < args.accum - 1 else contextlib.nullcontext()
        with sync:
            with training.autocast(dtype, device):
                logits, micro_loss = step_model(images, tokens, **kw)               # (B, M, K), scalar
            scaler.scale(micro_loss / args.accum).backward()
        targets = pre.targets_for(tokens, **kw)                                      # (B, M)
        stats += torch.stack([micro_loss.detach().double(), (logits.argmax(-1) == targets).sum().double(),
                              stats.new_tensor(targets.numel())])
    if dist.is_initialized():
        dist.all_reduce(stats)
    loss_sum, correct, count = stats.tolist()
    loss = loss_sum / (args.accum * (dist.get_world_size() if dist.is_initialized() else 1))
    if not math.isfinite(loss):
        raise SystemExit(f'pretrain.py: non-finite loss ({loss}) at step {step + 1}: lower --lr, lengthen '
                         f'--warmup-epochs or use --dtype bfloat16/float32; the last good checkpoint is in {args.out}')
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in pre.parameters() if p.requires_grad],
                                               args.clip_grad or math.inf)
    scale = scaler.get_scale()
    scaler.step(optimizer)                  # float16: skipped when the gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss, correct / count, float(grad_norm), scaler.is_enabled() and scaler.get_scale() < scale


def main(argv=None):
    """Run pre-training; returns a summary dict (steps, epochs, final loss and accuracy, speed)."""
    return training.run_command('pretrain.py', get_args_parser(), resolve_args, train, argv)


def train(args, d):
    device, W, accum = d.device, d.world_size, args.accum
    ckpt_path, log_path = os.path.join(args.out, 'ckpt.pt'), os.path.join(args.out, 'log.jsonl')
    try:
        if args.batch_size % (W * accum):
            raise ValueError(f'--batch-size {args.batch_size} is not divisible by {W} processes x --accum {accum}: '
                             f'use a multiple of {W * accum}')
        ckpt = training.load_checkpoint(ckpt_path) if args.resume else None
        if ckpt is not None:
            check_resume(ckpt, args, ckpt_path)
        elif os.path.exists(ckpt_path):
            raise ValueError(f'{ckpt_path} exists: pass --resume to continue that run, or another --out (or delete '
                             'it) to start a new one')
        if args.data == 'demo':
            tokenizer.ensure_demo_tokens(args.tokens, 'train', d.device)
        training.seed_everything(args.seed, d.rank)  # after the tokenizer, which draws from the streams
        # Sec. 3, 4.1: a ViT plus the objective's mask token and token classifier. The backbone's own
        # classifier takes no part: head is Identity (num_classes=0) and fc_norm is frozen, so DDP
        # waits for no gradient that never comes (find_unused_parameters costs a graph walk a step).
        backbone = model.create_model(args.model, num_classes=0, drop_path_rate=args.drop_path,
                                      layer_scale=args.layer_scale)
        backbone.fc_norm.requires_grad_(False)
        backbone.grad_checkpointing = args.grad_checkpointing
        dataset, tokens, meta = build_data(args, backbone.patch_embed.img_size, backbone.patch_embed.grid)
        pre = model.Pretrainer(backbone, args.objective, vocab_size=meta['vocab_size'], cut=args.cut,
                               mask_ratio=args.mask_ratio).to(device)
        optimizer = torch.optim.AdamW(training.param_groups(pre, args.weight_decay), lr=0.0, betas=BETAS, eps=EPS,
                                      fused=device.type == 'cuda')  # lr: set every step from the schedule
        dtype = training.resolve_dtype(args.dtype, device)
        scaler = training.grad_scaler(dtype, device)
        start_step, loss, acc = restore(ckpt, ckpt_path, pre, optimizer, scaler, d) if ckpt else (0, math.nan, math.nan)
    except ValueError as e:
        raise SystemExit(f'pretrain.py: {e}') from None
    training.start_run(args, args.out, d)
    if not args.resume and d.is_main and os.path.exists(log_path):
        os.remove(log_path)  # a log of an earlier attempt that never reached a checkpoint

    micro = args.batch_size // (W * accum)                # images per process per forward pass
    peak_lr = args.lr * args.batch_size / 2048            # linear scaling rule (BEiT, MAE)
    steps_per_epoch = len(dataset) // args.batch_size
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    last_step = min(total_steps, args.steps or total_steps)
    targets = pre.num_patches - pre.cut if pre.two_stream else pre.num_masked
    print0(f'{args.objective} on a {args.model} ViT ({sum(p.numel() for p in backbone.parameters()) / 1e6:.1f}M '
           f'parameters), {len(dataset)} images, tokens {meta["grid"]}x{meta["grid"]} of {meta["vocab_size"]} '
           f'({meta.get("features")}), {targets} targets of {pre.num_patches} patches')
    print0(f'batch {args.batch_size} = {W} process(es) x {accum} accum x {micro}; lr {args.lr:g} x '
           f'{args.batch_size}/2048 = {peak_lr:.3g}; {steps_per_epoch} steps/epoch, {total_steps} steps in all, '
           f'{warmup_steps} warmup; {str(dtype).replace("torch.", "")}')
    if start_step:
        print0(f'resumed {ckpt_path} at step {start_step} (epoch {start_step / steps_per_epoch:.2f})')

    ddp = None
    if W > 1:
        ddp = DistributedDataParallel(pre, device_ids=[d.local_rank] if device.type == 'cuda' else None)
    step_model = ddp or pre
    if args.compile:
        step_model = torch.compile(step_model)            # checkpoints still come from `pre`, uncompiled
    sampler = data.EpochSampler(dataset, W, d.rank, args.seed, per_epoch=steps_per_epoch * accum * micro)
    # A private generator: the loader must not draw from the process's stream (drop path uses it).
    loader = DataLoader(PretrainSet(data.TokenizedDataset(dataset, tokens, meta.get('skipped', ())), args.seed),
                        batch_size=micro, sampler=sampler, num_workers=args.workers, collate_fn=data.collate_skip,
                        pin_memory=device.type == 'cuda', persistent_workers=args.workers > 0, drop_last=True,
                        generator=torch.Generator())
    log = training.JsonLogger(log_path)
    bar = tqdm(total=last_step, initial=start_step, disable=not d.is_main, desc=f'pretrain {args.objective}',
               dynamic_ncols=True)
    pre.train()
    start_time = window_start = time.time()
    window, epoch_sum, skipped, step, final = [], [], 0, start_step, (loss, acc, 0)
    while step < last_step:
        epoch, done = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        sampler.skip = done * accum * micro
        batches = iter(loader)
        epoch_end = min(last_step, (epoch + 1) * steps_per_epoch)
        while step < epoch_end:
            lr = training.lr_at(step, total_steps, warmup_steps, peak_lr, args.min_lr, WARMUP_LR)
            for group in optimizer.param_groups:
                group['lr'] = lr * group['lr_scale']
            loss, acc, grad_norm, overflow = train_step(step_model, pre, ddp, batches, optimizer, scaler, args,
                                                        dtype, device, step)
            step, skipped = step + 1, skipped + overflow
            window.append((loss, acc, grad_norm))
            epoch_sum.append((loss, acc))
            bar.update()
            if step % args.log_every == 0 or step == last_step:
                n, now = len(window), time.time()
                mean = [sum(column) / n for column in zip(*window)]
                img_s = n * args.batch_size / (now - window_start)
                memory_mb = (torch.cuda.max_memory_allocated(device) if device.type == 'cuda'
                             else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
                log.log(step=step, epoch=round(step / steps_per_epoch, 4), loss=mean[0], token_acc=mean[1], lr=lr,
                        grad_norm=mean[2], img_per_s=img_s, peak_mem_mb=round(memory_mb),
                        **(dict(skipped_steps=skipped) if scaler.is_enabled() else {}))
                bar.set_postfix(loss=f'{mean[0]:.3f}', acc=f'{mean[1]:.3f}', lr=f'{lr:.2e}', img_s=f'{img_s:.0f}')
                final = (mean[0], mean[1], n)             # what the summary reports
                window, window_start = [], now
            if step % steps_per_epoch == 0:
                mean = [sum(column) / len(epoch_sum) for column in zip(*epoch_sum)]
                if d.is_main:
                    tqdm.write(f'epoch {step // steps_per_epoch}/{args.epochs}: loss {mean[0]:.4f}, token accuracy '
                               f'{mean[1]:.2%}, lr {lr:.2e}')
                epoch_sum = []
            if step % args.save_every == 0 or step == last_step:
                save(ckpt_path, pre, optimizer, scaler, step, loss, acc, args, meta, d)
    bar.close()
    log.close()

    wall = time.time() - start_time
    img_s = (step - start_step) * args.batch_size / wall
    if d.is_main:
        training.save_backbone(os.path.join(args.out, 'backbone.pt'), pre.backbone, dict(
            objective=args.objective, epochs=round(step / steps_per_epoch, 4), step=step, args=vars(args),
            tokens=token_info(args, meta)))
    print0(f'done: {step / steps_per_epoch:.2f} epochs, {step} steps, final loss {final[0]:.4f}, token accuracy '
           f'{final[1]:.2%} (last {final[2]} steps), {wall:.0f} s, {img_s:.0f} img/s -> '
           f'{args.out}/ckpt.pt, {args.out}/backbone.pt')
    return dict(step=step, epochs=step / steps_per_epoch, loss=final[0], token_acc=final[1], seconds=wall,
                img_per_s=img_s, skipped_steps=skipped)


if __name__ == '__main__':
    main()
