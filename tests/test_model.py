"""model.py: masks against a brute-force definition, information flow by autograd, the one-call
two-stream attention against a two-call reference (drop path included), timm parity, masking,
learning, errors, and drop path decided by drop_draws alone (so no batch split changes it)."""
import copy
import itertools

import pytest
import timm
import torch
import torch.nn.functional as F

import model
from model import Pretrainer, VisionTransformer, block_mask, build_masks, random_mask


pytestmark = pytest.mark.usefixtures('one_thread')


def small_vit(depth=2, **kw):
    """A fast ViT for the tests: 16 px images, patch 4 -> 4x4 grid, N = 16."""
    cfg = dict(img_size=16, patch_size=4, embed_dim=32, depth=depth, num_heads=2,
               drop_path_rate=0.0)
    return VisionTransformer(**{**cfg, **kw})


# ---------------------------------------------------------------------------------------------
# Masks against a brute-force construction from ranks

def brute_force_masks(objective, N, cut):
    """Visibility from first principles: every element of the content layout is (kind, rank),
    with CLS and visible patches at rank -1, targets and their mask tokens at their rank."""
    M = N - cut
    elements = [('cls', -1)] + [('visible', -1)] * cut + [('target', r) for r in range(M)]
    if objective == 'mapet':
        elements += [('masktoken', r) for r in range(M)]

    def content_sees(row, col):
        (rk, rr), (ck, cr) = row, col
        if ck in ('cls', 'visible'):
            return True
        if ck == 'target':  # content of a target: only to itself and later targets
            return rk == 'target' and cr <= rr
        # a mask token (position only): to everyone except targets at or before it in rank
        return not (rk == 'target' and cr <= rr)

    def query_sees(t, col):
        ck, cr = col
        if ck in ('cls', 'visible'):
            return True
        if ck == 'target':
            return cr < t
        return cr >= t  # mapet: own position and every later target's position

    content = torch.tensor([[content_sees(r, c) for c in elements] for r in elements])
    query = torch.tensor([[query_sees(t, c) for c in elements] for t in range(M)])
    return content, query


@pytest.mark.parametrize('objective', ['pim', 'mapet'])
@pytest.mark.parametrize('N,cut', [(4, 1), (4, 3), (16, 5), (64, 19), (196, 59)])
def test_masks_equal_brute_force(objective, N, cut):
    content, query = build_masks(objective, N, cut)
    expected_content, expected_query = brute_force_masks(objective, N, cut)
    assert content.dtype == torch.bool and query.dtype == torch.bool
    assert torch.equal(content, expected_content)
    assert torch.equal(query, expected_query)
    assert content[:, 0].all() and query[:, 0].all()  # every row sees at least CLS
    assert build_masks(objective, N, cut)[0] is content  # built once per shape


# ---------------------------------------------------------------------------------------------
# Information flow, measured by autograd

def patch_pixel_grads(grad, patch):
    """|grad| summed over the pixels of raster patch index `patch` of a 16 px, patch-4 image."""
    r, c = divmod(patch, 4)
    return grad[0, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4].abs().sum()


@pytest.mark.parametrize('objective', ['pim', 'mapet'])
def test_two_stream_information_flow(objective):
    torch.manual_seed(0)
    pre = Pretrainer(small_vit(depth=3), objective, vocab_size=11, cut=5).eval()
    images = torch.randn(1, 3, 16, 16, requires_grad=True)
    tokens = torch.randint(0, 11, (1, 16))
    perm = torch.randperm(16)[None]
    cut, M = 5, 11
    for t in range(M):
        logits, _ = pre(images, tokens, perm=perm)
        images.grad, pre.backbone.pos_embed.grad = None, None
        logits[0, t].sum().backward()
        for u in range(M):
            g = patch_pixel_grads(images.grad, int(perm[0, cut + u]))
            if u >= t:
                assert g == 0, f'target {t} sees the content of target {u}'
            else:
                assert g > 0, f'target {t} should see the content of earlier target {u}'
        for v in range(cut):
            assert patch_pixel_grads(images.grad, int(perm[0, v])) > 0
        # The position embedding of a later target: visible through MaPeT's mask tokens only.
        for u in range(t + 1, M):
            pos_grad = pre.backbone.pos_embed.grad[0, 1 + int(perm[0, cut + u])].abs().sum()
            if objective == 'mapet':
                assert pos_grad > 0, f'mapet target {t} should see the position of target {u}'
            else:
                assert pos_grad == 0, f'pim target {t} sees the position of later target {u}'


@pytest.mark.parametrize('objective', ['mim', 'beit'])
def test_masked_pixels_have_zero_gradient(objective):
    torch.manual_seed(0)
    pre = Pretrainer(small_vit(), objective, vocab_size=11).eval()
    images = torch.randn(2, 3, 16, 16, requires_grad=True)
    mask = random_mask(2, 16, 6)
    logits, loss = pre(images, torch.randint(0, 11, (2, 16)), mask=mask)
    assert logits.shape == (2, 6, 11)
    bb = pre.backbone  # logits[b, j] is the j-th masked patch of sample b, raster order
    corrupted = torch.where(mask[..., None], pre.mask_token, bb.patch_embed(images))
    out = bb.run_blocks(bb.embed(corrupted))
    expected = torch.stack([out[b, 1 + mask[b].nonzero()[:, 0]] for b in range(2)])
    torch.testing.assert_close(pre.forward_loss(expected, pre.targets_for(
        torch.zeros(2, 16), mask=mask))[0], logits)
    loss.backward()
    for b, p in itertools.product(range(2), range(16)):
        g = patch_pixel_grads(images.grad[b:b + 1], p)
        assert (g == 0) if mask[b, p] else (g > 0)


# ---------------------------------------------------------------------------------------------
# The one-call two-stream attention against a straightforward two-call reference

def reference_two_stream(pre, images, perm, drop_draws=None):
    """XLNet's two streams as two separate explicit-softmax attentions per block (Eq. 3), both
    streams computed in every block; drop path as the API promises, for both streams alike."""
    bb, cut = pre.backbone, pre.cut
    B, N, D = perm.shape[0], pre.num_patches, bb.embed_dim
    x = bb.patch_embed(images) + bb.pos_embed[:, 1:]
    cls = bb.cls_token + bb.pos_embed[:, :1]
    pos = bb.pos_embed[0, 1:]
    h_rows, g_rows = [], []
    for b in range(B):
        order = perm[b]
        tpos = pos[order[cut:]]
        rows = [cls[0], x[b, order]] + ([pre.mask_token[0] + tpos] if pre.objective == 'mapet'
                                        else [])
        h_rows.append(torch.cat(rows))
        g_rows.append(pre.mask_token[0] + tpos)
    h, g = torch.stack(h_rows), torch.stack(g_rows)
    content_mask, query_mask = brute_force_masks(pre.objective, N, cut)

    def attend(block, queries, keys, allowed):
        Hh = block.attn.num_heads
        w, bias = block.attn.qkv.weight, block.attn.qkv.bias
        q = F.linear(queries, w[:D], bias[:D])
        k = F.linear(keys, w[D:2 * D], bias[D:2 * D])
        v = F.linear(keys, w[2 * D:], bias[2 * D:])
        def split(t):
            return t.view(B, -1, Hh, D // Hh).transpose(1, 2)
        scores = split(q) @ split(k).transpose(-1, -2) / (D // Hh) ** 0.5
        scores = scores.masked_fill(~allowed, float('-inf'))
        out = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(B, -1, D)
        return block.attn.proj(out)

    for i, block in enumerate(bb.blocks):
        p = block.drop_path.p
        keep = 1 if drop_draws is None else (drop_draws[:, i, None, None] >= p) / (1 - p)
        hn, gn = block.norm1(h), block.norm1(g)
        h_new = h + keep * block.ls1(attend(block, hn, hn, content_mask))
        g_new = g + keep * block.ls1(attend(block, gn, hn, query_mask))
        h = h_new + keep * block.ls2(block.mlp(block.norm2(h_new)))
        g = g_new + keep * block.ls2(block.mlp(block.norm2(g_new)))
    return g


@pytest.mark.parametrize('objective', ['pim', 'mapet'])
def test_one_call_attention_equals_two_call_reference(objective):
    torch.manual_seed(1)
    vit = small_vit(depth=3, drop_path_rate=0.5)
    pre = Pretrainer(vit, objective, vocab_size=7, cut=6)
    for p in pre.parameters():  # move off the initial values so every weight matters
        p.data.add_(0.05 * torch.randn_like(p))
    images = torch.randn(3, 3, 16, 16)
    perm = torch.stack([torch.randperm(16) for _ in range(3)])
    draws = torch.tensor([[0.9, 0.1, 0.9], [0.9, 0.9, 0.2], [0.0, 0.0, 0.0]])  # some dropped
    with torch.no_grad():
        ours = pre.eval().forward_two_stream(images, perm)
        ref = reference_two_stream(pre, images, perm)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        dropped = pre.train().forward_two_stream(images, perm, draws)
        ref = reference_two_stream(pre, images, perm, draws)
        torch.testing.assert_close(dropped, ref, rtol=1e-5, atol=1e-5)
    assert ours.shape == (3, 10, 32) and not torch.allclose(ours, dropped)


# ---------------------------------------------------------------------------------------------
# The fine-tuning path is a standard (timm) ViT

@pytest.mark.parametrize('objective', ['mapet', 'mim'])
def test_backbone_is_a_timm_vit(objective):
    torch.manual_seed(2)
    config = {**model.MODEL_CONFIGS['micro'], 'depth': 2}
    backbone = model.create_model('micro', num_classes=10, depth=2)
    pre = Pretrainer(backbone, objective, vocab_size=32)
    optimizer = torch.optim.AdamW(pre.parameters(), lr=1e-2)
    n = (config['img_size'] // config['patch_size']) ** 2  # patches per image
    for _ in range(3):  # a few pre-training steps move every weight, layer scale included
        _, loss = pre(torch.randn(4, 3, 32, 32), torch.randint(0, 32, (4, n)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    reference = timm.models.vision_transformer.VisionTransformer(
        **config, num_classes=10, global_pool='avg', init_values=0.1)
    reference.load_state_dict(pre.backbone.state_dict(), strict=True)
    images = torch.randn(5, 3, 32, 32)
    pre.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(pre.backbone(images), reference(images), rtol=1e-5, atol=1e-5)


def test_vit_sizes_match_timm_layouts():
    names = [('tiny', 'vit_tiny_patch16_224'), ('small', 'vit_small_patch16_224'),
             ('base', 'vit_base_patch16_224')]
    for name, timm_name in names:
        with torch.device('meta'):  # shapes only: no memory, no initialisation
            ours = model.create_model(name, num_classes=1000).state_dict()
            ref = timm.create_model(timm_name, global_pool='avg', init_values=0.1).state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


# ---------------------------------------------------------------------------------------------
# Input masks of mim and beit

def test_block_mask_exact_count_and_blocky():
    g = torch.Generator().manual_seed(0)
    same_neighbour = []
    for _ in range(200):
        mask = block_mask(14, 75, generator=g)
        assert mask.shape == (196,) and int(mask.sum()) == 75
        grid = mask.view(14, 14).float()
        padded = F.pad(grid, (1, 1, 1, 1))
        neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
        same_neighbour.append((neighbours[grid.bool()] / 4).mean())
    # A masked patch's 4-neighbours: ~38% masked for uniform random masks, far more for blocks.
    assert torch.stack(same_neighbour).mean() > 0.6
    # scaled to other grids: 40% of an 8x8 grid
    assert int(block_mask(8, 26, generator=g).sum()) == 26


def test_random_mask_ratio_and_uniformity():
    torch.manual_seed(0)
    mask = random_mask(4000, 16, 6)
    assert (mask.sum(1) == 6).all()
    frequency = mask.float().mean(0)
    assert (frequency - 6 / 16).abs().max() < 0.04  # every patch equally likely
    pre = Pretrainer(small_vit(), 'mim', vocab_size=5, mask_ratio=0.4)
    assert (pre.draw_mask(3).sum(1) == round(0.4 * 16)).all()
    beit = Pretrainer(small_vit(), 'beit', vocab_size=5, mask_ratio=0.4)
    assert (beit.draw_mask(3).sum(1) == round(0.4 * 16)).all()


# ---------------------------------------------------------------------------------------------
# Learning and errors

@pytest.mark.parametrize('objective', model.OBJECTIVES)
def test_a_few_steps_lower_the_loss(objective):
    torch.manual_seed(3)
    pre = Pretrainer(small_vit(depth=2), objective, vocab_size=8)
    images = torch.randn(8, 3, 16, 16)
    tokens = torch.randint(0, 8, (8, 16))
    perm = torch.stack([torch.randperm(16) for _ in range(8)])
    mask = pre.draw_mask(8) if not pre.two_stream else None
    optimizer = torch.optim.AdamW(pre.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        logits, loss = pre(images, tokens, perm=perm, mask=mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    targets = pre.targets_for(tokens, perm=perm, mask=mask)
    assert targets.shape == logits.shape[:2]
    assert (logits.argmax(-1) == targets).float().mean() > 0.5


def test_errors_say_what_to_change():
    vit = small_vit()
    with pytest.raises(ValueError, match='cut must be an integer in 1..15'):
        Pretrainer(vit, 'mapet', cut=16)
    with pytest.raises(ValueError, match='cut must be'):
        Pretrainer(vit, 'pim', cut=0)
    with pytest.raises(ValueError, match='unknown objective'):
        Pretrainer(vit, 'mae')
    with pytest.raises(ValueError, match='unknown model'):
        model.create_model('huge')
    pre = Pretrainer(vit, 'mapet', vocab_size=10, cut=4)
    with pytest.raises(ValueError, match=r'expects \[B, 3, 16, 16\].*img_size=32'):
        pre(torch.randn(2, 3, 32, 32), torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match='tokens have shape'):
        pre(torch.randn(2, 3, 16, 16), torch.zeros(2, 15, dtype=torch.long))
    with pytest.raises(ValueError, match='outside the vocabulary'):
        pre(torch.randn(2, 3, 16, 16), torch.full((2, 16), 10))
    with pytest.raises(ValueError, match='build_masks is for the two-stream'):
        build_masks('mim', 16, 4)
    mim = Pretrainer(vit, 'mim', vocab_size=10)
    uneven = torch.zeros(2, 16, dtype=torch.bool)
    uneven[0, :3], uneven[1, :4] = True, True
    with pytest.raises(ValueError, match='same, non-zero number'):
        mim(torch.randn(2, 3, 16, 16), torch.zeros(2, 16, dtype=torch.long), mask=uneven)
    # tokens given as a (B, G, G) grid are accepted
    logits, _ = pre(torch.randn(2, 3, 16, 16), torch.zeros(2, 4, 4, dtype=torch.long))
    assert logits.shape == (2, 12, 10)


@pytest.mark.parametrize('objective', ['mapet', 'cae'])
def test_gradient_checkpointing_gives_the_same_gradients(objective):
    """DDP waits for a gradient of every parameter but fc_norm (the fine-tuning classifier's,
    which pre-training never reaches); checkpointing changes none (cae: its target pass runs
    under no_grad)."""
    torch.manual_seed(5)
    pre = Pretrainer(small_vit(depth=3, drop_path_rate=0.2), objective, vocab_size=9)
    images, tokens = torch.randn(4, 3, 16, 16), torch.randint(0, 9, (4, 16))
    corrupt = dict(perm=pre.draw_perm(4)) if pre.two_stream else dict(mask=pre.draw_mask(4))
    draws = pre.draw_drop(4)
    grads = []
    for checkpointing in (False, True):
        pre.backbone.grad_checkpointing = checkpointing
        pre.zero_grad(set_to_none=True)
        pre(images, tokens, **corrupt, drop_draws=draws)[1].backward()
        grads.append({n: p.grad for n, p in pre.named_parameters() if p.grad is not None})
    assert set(grads[0]) == {n for n, _ in pre.named_parameters()} - {
        'backbone.fc_norm.weight', 'backbone.fc_norm.bias'}
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], msg=name)


# ---------------------------------------------------------------------------------------------
# Drop path: decided by drop_draws (B, depth), so it cannot depend on how a batch is split

def run(net, images, tokens, perm, draws=None):
    """The output under test: the backbone's classifier logits or the Pretrainer's logits."""
    if isinstance(net, VisionTransformer):
        return net(images, drop_draws=draws)
    return net(images, tokens, perm=perm, mask=perm < 6, drop_draws=draws)[0]


def drop_setup(kind):
    torch.manual_seed(7)
    vit = small_vit(depth=3, drop_path_rate=0.5, num_classes=5)  # rates 0, 0.25, 0.5
    net = vit if kind == 'vit' else Pretrainer(vit, kind, vocab_size=9, cut=6)
    for p in net.parameters():  # off the initial values, so that every branch matters
        p.data.add_(0.05 * torch.randn_like(p))
    images, tokens = torch.randn(4, 3, 16, 16), torch.randint(0, 9, (4, 16))
    return net.train(), images, tokens, torch.stack([torch.randperm(16) for _ in range(4)])


@pytest.mark.parametrize('kind', ['vit', 'mim', 'mapet'])
def test_drop_draws_make_the_output_independent_of_the_batch_split(kind):
    net, images, tokens, perm = drop_setup(kind)
    draws = torch.rand(4, 3)
    with torch.no_grad():
        whole = run(net, images, tokens, perm, draws)
        halves = [run(net, images[s], tokens[s], perm[s], draws[s])
                  for s in (slice(0, 2), slice(2, 4))]
        torch.testing.assert_close(whole, torch.cat(halves))
        assert not torch.allclose(run(net, images, tokens, perm, 1 - draws), whole)  # draws matter
        torch.manual_seed(8)
        drawn = run(net, images, tokens, perm)                        # None: drawn by the model
        torch.manual_seed(8)
        torch.testing.assert_close(drawn, run(net, images, tokens, perm, net.draw_drop(4)))


@pytest.mark.parametrize('kind', ['vit', 'mim', 'mapet'])
def test_drop_draws_decide_the_drop(kind):
    """A row of ones keeps every branch, scaled by 1 / (1 - rate): the eval-mode model with its
    layer scales so scaled. A row of zeros drops every branch at rate > 0: the model cut to
    its first block (rate 0)."""
    net, images, tokens, perm = drop_setup(kind)
    with torch.no_grad():
        out = run(net, images, tokens, perm, torch.tensor([[1.0] * 3, [0.0] * 3] * 2))
        kept = copy.deepcopy(net).eval()
        blocks = kept if kind == 'vit' else kept.backbone
        for block in blocks.blocks:
            block.ls1.gamma /= 1 - block.drop_path.p
            block.ls2.gamma /= 1 - block.drop_path.p
        cut = copy.deepcopy(net).eval()
        first = cut if kind == 'vit' else cut.backbone
        first.blocks = first.blocks[:1]
        torch.testing.assert_close(out[0::2], run(kept, images, tokens, perm)[0::2])
        torch.testing.assert_close(out[1::2], run(cut, images, tokens, perm)[1::2])
        assert not torch.allclose(out, run(net.eval(), images, tokens, perm))
