"""bench.py: its naive two-stream reference computes exactly what model.py computes (so the speed
comparison is fair), its per-sample masks are model.py's masks seen in raster order, and the
command runs end to end in --quick mode, writing the JSON rows it promises. No timing asserts."""
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
from model import OBJECTIVES, Pretrainer, VisionTransformer, build_masks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, CUT, HEADS, DEPTH = 16, 5, 2, 2


pytestmark = pytest.mark.usefixtures('one_thread')


def tiny_pretrainer(objective, drop_path):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=DEPTH, num_heads=HEADS,
                            drop_path_rate=drop_path)
    return Pretrainer(vit, objective, vocab_size=50, cut=CUT).train()


def batch(B=3):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, 16, 16, generator=g)
    tokens = torch.randint(50, (B, 4, 4), generator=g)
    perm = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    return images, tokens, perm


@pytest.mark.parametrize('objective', ['pim', 'mapet'])
def test_naive_masks_are_model_masks_in_raster_order(objective):
    """Re-index each sample's raster-order reference masks into the permuted layout of model.py:
    they must equal build_masks' pair, for every sample and every head."""
    _, _, perm = batch()
    content, query = bench.naive_masks(perm, CUT, objective, HEADS, 'cpu')
    want_content, want_query = build_masks(objective, N, CUT)
    M = N - CUT
    L = want_content.shape[0]
    assert content.shape == (3, HEADS, L, L) and query.shape == (3, HEADS, M, L)
    assert content.dtype == torch.float32 and set(content.unique().tolist()) == {0.0, float('-inf')}
    for b, p in enumerate(perm):
        raster_targets = p[CUT:].sort().values
        slot = torch.empty(N, dtype=torch.long)          # patch -> its target slot, raster order
        slot[raster_targets] = torch.arange(M)
        tokens = (1 + N + slot[p[CUT:]]).tolist() if objective == 'mapet' else []
        index = torch.tensor([0] + (1 + p).tolist() + tokens)  # model layout -> reference layout
        for h in range(HEADS):
            assert torch.equal(content[b, h][index][:, index] == 0, want_content)
            assert torch.equal(query[b, h][slot[p[CUT:]]][:, index] == 0, want_query)


@pytest.mark.parametrize('objective', ['pim', 'mapet'])
@pytest.mark.parametrize('drop_path', [0.0, 0.5])
def test_naive_reference_has_model_loss_and_gradients(objective, drop_path):
    """Same weights, permutation and drop-path draws: same logits, loss and gradients."""
    pre = tiny_pretrainer(objective, drop_path)
    images, tokens, perm = batch()
    draws = torch.rand(3, DEPTH, generator=torch.Generator().manual_seed(7))  # (B, depth)
    logits, loss = pre(images, tokens, perm=perm, drop_draws=draws)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in pre.named_parameters() if p.grad is not None}
    pre.zero_grad(set_to_none=True)

    masks = bench.naive_masks(perm, CUT, objective, HEADS, 'cpu')
    naive_logits, naive_loss = bench.naive_step(pre, images, tokens, perm, *masks, draws)
    naive_loss.backward()
    naive_grads = {n: p.grad.clone() for n, p in pre.named_parameters() if p.grad is not None}

    # model.py's row t predicts patch perm[cut + t]; the reference's rows are in raster order.
    order = perm[:, CUT:].argsort(dim=1)
    torch.testing.assert_close(naive_logits, logits.gather(1, order[..., None].expand_as(logits)),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(naive_loss, loss, rtol=1e-5, atol=1e-6)
    assert naive_grads.keys() == grads.keys()
    assert {'mask_token', f'backbone.blocks.{DEPTH - 1}.attn.qkv.weight'} <= grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(naive_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    if drop_path:  # the draws mattered: other draws drop other samples and change both losses
        other = 1 - draws
        assert not torch.allclose(pre(images, tokens, perm=perm, drop_draws=other)[1], loss)
        assert not torch.allclose(bench.naive_step(pre, images, tokens, perm, *masks, other)[1],
                                  loss)


def test_flop_count_includes_fused_attention():
    """FlopCounterMode alone counts nothing for the CPU attention kernel: with bench's formula a
    masked SDPA forward+backward costs what the same attention written with matmuls costs."""
    q, k, v = (torch.randn(2, 3, n, 8, requires_grad=True) for n in (7, 5, 5))
    mask = torch.rand(7, 5) > 0.3
    mask[:, 0] = True

    def fused():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def explicit():
        return (q @ k.transpose(-2, -1)).masked_fill(~mask, float('-inf')).softmax(-1) @ v

    (fused_flops, kernel), (explicit_flops, none) = (
        bench.count_flops(lambda attention=attention: attention().sum().backward())
        for attention in (fused, explicit))
    assert fused_flops == explicit_flops == 3 * 2 * (2 * 3 * 7 * 5 * 8) * 2
    assert kernel == 'flash_attention_for_cpu' and none == 'math'


@pytest.mark.slow
def test_quick_run_writes_the_rows(tmp_path):
    out = tmp_path / 'bench.jsonl'
    run = subprocess.run([sys.executable, 'bench.py', '--quick', '--threads', '1', '--json',
                          str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = {r['kind'] for r in rows}
    assert {'machine', 'matmul', 'step', 'target', 'clip', 'kmeans', 'input'} <= kinds
    paths = [r['path'] for r in rows if r['kind'] == 'input']
    assert len(paths) == 5 and paths[0].startswith('JPEG')
    assert paths[-1].startswith('cache: loader +')
    assert all(r['img_s'] > 0 for r in rows if r['kind'] == 'input')
    steps = {(r['objective'], r['impl']) for r in rows if r['kind'] == 'step'}
    assert steps == {(o, 'ours') for o in OBJECTIVES} | {('pim', 'naive'), ('mapet', 'naive')}
    fields = ('step_ms', 'img_s', 'peak_mem_mb', 'gflop_per_img', 'tflop_s', 'mfu', 'mask_ms',
              'sdpa')
    for r in rows:
        if r['kind'] == 'step':
            assert all(f in r for f in fields)
            assert r['step_ms'] > 0 and r['peak_mem_mb'] > 0 and r['gflop_per_img'] > 0
    ours = {r['sdpa'] for r in rows if r['kind'] == 'step' and r['impl'] == 'ours'}
    assert ours <= {'flash_attention_for_cpu', 'math'}
    names = {r['name'] for r in rows if r['kind'] == 'target'}
    assert {'mapet step time, naive / ours', 'mapet peak memory, ours / naive',
            'mapet mask cost per batch, naive / ours', 'mapet/mim step-time ratio / FLOP ratio',
            'mapet MFU'} <= names
    assert 'mapet ours' in run.stdout and 'target: mapet MFU' in run.stdout


def test_gpu_check_smoke_test_on_a_cpu(tmp_path):
    """--gpu-check --quick runs every part of the GPU check at micro scale: fp16 + GradScaler
    (its loss falls), the end-to-end loop on --data synthetic, the input pipeline."""
    out = tmp_path / 'gpu.jsonl'
    run = subprocess.run([sys.executable, 'bench.py', '--gpu-check', '--quick', '--threads', '1',
                          '--json', str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {r['kind']: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows['fp16']['passed'] and rows['fp16']['last_loss'] < rows['fp16']['first_loss'] - 1
    assert rows['end_to_end']['img_s'] > 0 and rows['step']['objective'] == 'mapet'
    assert 'input' in rows and 'clip' not in rows


@pytest.mark.parametrize('argv, message', [(['--clip-size', '100'], 'multiple of 32'),
                                           (['--batch', '0'], '--batch must be at least 1'),
                                           (['--warmup', '-1'], '--warmup must be at least 0'),
                                           (['--device', 'tpu'], 'use cpu, or cuda'),
                                           (['--gpu-check'], 'no GPU is visible')])
def test_bad_arguments_are_one_line_errors(argv, message):
    with pytest.raises(SystemExit) as error:
        bench.resolve_args(bench.get_args_parser().parse_args(argv))
    assert message in str(error.value) and '\n' not in str(error.value)


@pytest.mark.slow
def test_bad_arguments_print_no_traceback():
    run = subprocess.run([sys.executable, 'bench.py', '--clip-size', '100'], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode != 0 and run.stderr.strip().count('\n') == 0
    assert 'multiple of 32' in run.stderr and 'Traceback' not in run.stderr
