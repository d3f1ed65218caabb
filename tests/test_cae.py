"""model.py's CAE objective (Chen et al. 2022; the paper's Sec. 5.1 competitor): information flow
by autograd, the alignment target without gradient, drop path decided by the draws alone, the
50 % block mask, timm parity, pretrain.py's exact resume, accumulation and two processes.
Learning: test_model's test_a_few_steps_lower_the_loss, over OBJECTIVES; every weight trained:
its test_gradient_checkpointing_gives_the_same_gradients."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import test_model
from model import Pretrainer
from test_model import patch_pixel_grads, small_vit
from test_pretrain import FAST, ROOT, assert_same_run, read_log, run_folder, state_of


pytestmark = pytest.mark.usefixtures('one_thread')


def perturbed(pre):
    """Weights moved off their initial values, so that every branch matters."""
    for p in pre.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return pre


def test_masked_patches_reach_no_loss():
    """The cross-entropy of a masked patch has zero gradient at every masked patch's pixels (its
    own included) and a non-zero one at every visible patch's; so has the whole loss: the
    alignment target (the masked patches, encoded) carries no gradient into the encoder."""
    torch.manual_seed(0)
    pre = perturbed(Pretrainer(small_vit(depth=3), 'cae', vocab_size=11)).eval()
    images = torch.randn(1, 3, 16, 16, requires_grad=True)
    tokens = torch.randint(0, 11, (1, 16))
    mask = pre.draw_mask(1)
    logits, loss = pre(images, tokens, mask=mask)
    targets = pre.targets_for(tokens, mask=mask)
    cross_entropy = F.cross_entropy(logits[0], targets[0])
    assert loss > cross_entropy + 1e-3  # the alignment term is there
    per_patch = [F.cross_entropy(logits[0, j], targets[0, j]) for j in range(logits.shape[1])]
    for name, part in [(f'masked patch {j}', ce) for j, ce in enumerate(per_patch)] + [
            ('the loss', loss)]:
        images.grad = None
        part.backward(retain_graph=True)
        for n in range(16):
            g = patch_pixel_grads(images.grad, n)
            assert (g == 0) if mask[0, n] else (g > 0), f'{name}, patch {n}: gradient {g}'


def test_drop_draws_decide_every_block():
    """A column per encoder, regressor and decoder block: an output of the whole batch is that of
    its halves, and a column decides its block's drop unless the block's rate is 0."""
    torch.manual_seed(7)
    pre = perturbed(Pretrainer(small_vit(depth=6, drop_path_rate=0.5), 'cae', vocab_size=9))
    images, tokens = torch.randn(4, 3, 16, 16), torch.randint(0, 9, (4, 16))
    mask, draws = pre.draw_mask(4), pre.draw_drop(4)
    assert draws.shape == (4, 6 + 2 + 2)  # regressor and decoder: depth // 3 blocks each
    rates = [b.drop_path.p for b in [*pre.backbone.blocks, *pre.regressor, *pre.latent_decoder]]
    with torch.no_grad():
        whole = pre.train()(images, tokens, mask=mask, drop_draws=draws)
        halves = [pre(images[s], tokens[s], mask=mask[s], drop_draws=draws[s])
                  for s in (slice(0, 2), slice(2, 4))]
        torch.testing.assert_close(whole[0], torch.cat([h[0] for h in halves]))
        torch.testing.assert_close(whole[1], sum(h[1] for h in halves) / 2)
        ones = pre(images, tokens, mask=mask, drop_draws=torch.ones(4, 10))[1]
        for column, rate in enumerate(rates):
            dropped = torch.ones(4, 10).index_fill_(1, torch.tensor([column]), 0.0)
            changed = pre(images, tokens, mask=mask, drop_draws=dropped)[1] != ones
            assert changed == (rate > 0), f'column {column} (rate {rate})'


def test_half_the_patches_masked_in_blocks():
    torch.manual_seed(0)
    pre = Pretrainer(small_vit(), 'cae', vocab_size=5, mask_ratio=0.4)  # mim/beit's flag: ignored
    masks = pre.draw_mask(200).view(-1, 1, 4, 4)
    assert pre.num_masked == 8 and (masks.sum((1, 2, 3)) == 8).all()
    cross = torch.tensor([[0.0, 1, 0], [1, 0, 1], [0, 1, 0]])[None, None]
    neighbours = F.conv2d(masks.float(), cross, padding=1)  # masked 4-neighbours, zero outside
    # of a masked patch's 4 neighbours: 61 % masked here (BEiT's blocks), 35 % for random masks
    assert (neighbours[masks] / 4).mean() > 0.5


def test_backbone_is_a_timm_vit():
    test_model.test_backbone_is_a_timm_vit('cae')  # a few CAE steps, then timm's logits


@pytest.fixture(scope='module')
def folder(make_demo_folder):
    return make_demo_folder(train=24)  # 3 steps per epoch at batch 8


@pytest.mark.slow
def test_resume_accumulation_and_two_processes_are_exact(folder, tmp_path):
    """pretrain.py --objective cae, drop path on: 4 steps == 2 + --resume + 2, bit for bit; and
    == 2 micro-batches of 4 accumulated, == 2 processes of 4 (torchrun: DDP finds every
    parameter's gradient), up to float order."""
    cae = ['--objective', 'cae', '--steps', '4']
    run_folder(folder, tmp_path / 'one', *cae)
    run_folder(folder, tmp_path / 'split', *cae[:-1], '2')
    run_folder(folder, tmp_path / 'split', *cae, '--resume')
    assert [r['loss'] for r in read_log(tmp_path / 'one')] == [
        r['loss'] for r in read_log(tmp_path / 'split')]
    one, split = state_of(tmp_path / 'one')['model'], state_of(tmp_path / 'split')['model']
    assert all(torch.equal(one[key], split[key]) for key in one)
    run_folder(folder, tmp_path / 'accum', *cae, '--accum', '2')
    assert_same_run(tmp_path / 'one', tmp_path / 'accum', '--accum 2')
    root, tokens = folder
    result = subprocess.run([
        sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
        'pretrain.py', '--data', root, '--tokens', tokens, '--out', str(tmp_path / 'two'),
        '--batch-size', '8', '--epochs', '2', '--warmup-epochs', '1', '--lr', '0.5', *FAST, *cae,
    ], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(tmp_path / 'one', tmp_path / 'two', 'torchrun 2 processes')
