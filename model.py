"""The Vision Transformer, the two-stream attention masks, and the five pre-training objectives.

Paper: Baraldi et al., "Learning to Mask and Permute Visual Tokens for Vision Transformer
Pre-Training" (MaPeT), Sec. 3-4.1, Fig. 1-2, Eq. 1-3. Every objective predicts the visual token
of some patches (Sec. 3, "Visual tokens") with a linear classifier over the vocabulary:

    mim    random patches replaced by a mask token and predicted (Fig. 1a)
    beit   as mim, with BEiT's block-wise masking
    pim    patches permuted, the last M predicted one by one by a query stream (Eq. 1, Fig. 1b)
    mapet  pim + position-aware mask tokens of all targets in the content stream (Eq. 2, Fig. 1c)
    cae    CAE (Sec. 5.1): the ViT encodes the visible half; a regressor + decoder predict the rest

The backbone's state dict is timm's (global_pool='avg', init_values=0.1): a fine-tuned
checkpoint loads into `timm.create_model('vit_small_patch16_224', ...)` unchanged.

    from model import create_model, Pretrainer
    pre = Pretrainer(create_model('tiny'), 'mapet', vocab_size=8192)
    logits, loss = pre(images, tokens)  # images (B, 3, 224, 224), tokens (B, 196)
    classifier = pre.backbone  # a plain ViT: classifier(images) -> (B, classes)

Test: python -m pytest -q tests/test_model.py

Shape letters: B batch, N patches, M targets, L content length, D width, H heads, K vocabulary,
G grid side.
"""
import math
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

OBJECTIVES = ('mim', 'beit', 'pim', 'mapet', 'cae')

# The ViT backbone (Sec. 3, "Image patches"), in timm's parameter layout.

MODEL_CONFIGS = {
    # The 32 px demo images on a CPU: a 4x4 grid of 8 px patches (N = 16), 0.2M parameters.
    'micro': dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2),
    # Tab. 7: hidden size 192 / 384 / 768, FFN 4x, heads of size 64, 12 layers, patch 16, 224 px.
    'tiny': dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3),
    'small': dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    'base': dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
}


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, embed_dim):
        super().__init__()
        self.img_size, self.grid = img_size, img_size // patch_size
        self.num_patches = self.grid ** 2
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images):
        """(B, 3, H, W) -> (B, N, D), patches in raster order."""
        size = self.img_size
        if images.shape[1:] != (3, size, size):
            raise ValueError(f'images have shape {tuple(images.shape)}, the model expects '
                             f'[B, 3, {size}, {size}]: resize them or build the model with '
                             f'img_size={images.shape[-1]}')
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)  # timm's layout: [W_q; W_k; W_v]
        self.proj = nn.Linear(dim, dim)

    def project(self, x, context):
        """q (B, H, T, D/H) from x (B, T, D); k, v (B, H, L, D/H) from context (B, L, D)."""
        D, H = x.shape[-1], self.num_heads
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(x, w[:D], b[:D]).unflatten(-1, (H, -1)).transpose(1, 2)
        # baddbmm reads a strided context (two_stream's view) in place; F.linear would copy it
        kv = torch.baddbmm(b[D:], context, w[D:].T.expand(len(context), -1, -1))  # (B, L, 2D)
        k, v = kv.unflatten(-1, (2, H, -1)).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x, context, mask=None):
        """(B, T, D) -> (B, T, D); mask (T, L) bool, True = may attend."""
        out = F.scaled_dot_product_attention(*self.project(x, context), attn_mask=mask)
        return self.proj(out.transpose(1, 2).flatten(2))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual scale (CaiT), 0.1 at first (Tab. 7, "Layer scale")."""

    def __init__(self, dim, init_value):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth (Tab. 7): drop sample b's branch iff its draw < p, else scale it by
    1 / (1 - p). The caller draws, so draws can depend on (seed, epoch, index)."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x, draws=None):
        """x (B, T, D), draws (B,) uniforms in [0, 1) or None (keep all)."""
        if draws is None or self.p == 0:
            return x
        return x * ((draws >= self.p).to(x.dtype) / (1 - self.p))[:, None, None]


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, layer_scale, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layer_scale)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, context=None, mask=None, drops=None):
        """x (B, T, D) -> (B, T, D), attending to context (B, L, D): x itself in a plain ViT."""
        xn = self.norm1(x)
        return self.residuals(x, xn, xn if context is None else self.norm1(context), mask, drops)

    def two_stream(self, h, g, mask, drops=None):
        """Eq. 3: content stream h (B, L, D), query stream g (B, M, D) -> (h, g), weights shared.

        Queries from [h; g], keys and values from h only: XLNet's definition of the query stream
        (g may see content but is never seen as content), not an optimisation. So one attention
        call serves both streams, with the mask [content_mask; query_mask] (L+M, L).
        """
        x = torch.cat([h, g], dim=1)  # (B, L+M, D)
        xn = self.norm1(x)
        # LayerNorm acts per row: h's normalised rows are a view of xn's, no second pass or copy
        x = self.residuals(x, xn, xn[:, :h.shape[1]], mask, drops)
        return x.split([h.shape[1], g.shape[1]], dim=1)

    def residuals(self, x, xn, context, mask, drops):
        """x + attention of its normalised rows xn to `context` (normalised), then x + MLP."""
        x = x + self.drop_path(self.ls1(self.attn(xn, context, mask)), drops)
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))), drops)


class VisionTransformer(nn.Module):
    """ViT with a CLS token, learned absolute positions, layer scale and stochastic depth."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, num_classes=0, drop_path_rate=0.1, layer_scale=0.1):
        super().__init__()
        self.config = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                           depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           num_classes=num_classes, drop_path_rate=drop_path_rate,
                           layer_scale=layer_scale)
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim))
        # Deeper blocks are dropped more often; floats, even when built on the meta device.
        rates = torch.linspace(0, drop_path_rate, depth, device='cpu').tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, layer_scale, rate)
                                    for rate in rates)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False  # recompute activations in backward to save memory
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights)

    def embed(self, patches):
        """Patch embeddings (B, N, D) -> tokens (B, 1+N, D): CLS first, positions added."""
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.pos_embed

    def draw_drop(self, batch, device=None):
        """Drop-path draws (B, depth) from torch's default stream (see DropPath)."""
        return torch.rand(batch, len(self.blocks), device=device)

    def drops_per_block(self, batch, drop_draws, device):
        """Each block's (B,) column of drop_draws (drawn if None); Nones in eval or at rate 0."""
        if not self.training or self.config['drop_path_rate'] == 0:
            return [None] * len(self.blocks)
        return (self.draw_drop(batch, device) if drop_draws is None else drop_draws).unbind(1)

    def run_block(self, block, *args):
        if self.grad_checkpointing and self.training:
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def run_blocks(self, x, drop_draws=None):
        """x (B, T, D) through every block."""
        for block, drops in zip(self.blocks, self.drops_per_block(len(x), drop_draws, x.device)):
            x = self.run_block(block, x, None, None, drops)
        return x

    def forward_features(self, images, drop_draws=None):
        """All tokens after the last block: (B, 1+N, D), CLS first."""
        return self.run_blocks(self.embed(self.patch_embed(images)), drop_draws)

    def pool(self, features):
        """The image's features: mean of the patch tokens (not CLS) -> fc_norm (Sec. 5.1)."""
        return self.fc_norm(features[:, 1:].mean(dim=1))

    def forward(self, images, drop_draws=None):
        return self.head(self.pool(self.forward_features(images, drop_draws)))  # (B, classes)


def init_weights(module):
    """timm's init; LayerNorms keep PyTorch's."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)


def create_model(name, **overrides):
    if name not in MODEL_CONFIGS:
        raise ValueError(f'unknown model {name!r}: choose one of {", ".join(MODEL_CONFIGS)}')
    return VisionTransformer(**{**MODEL_CONFIGS[name], **overrides})


# Attention masks of the two-stream objectives (Sec. 4.1 "Attention masking", Fig. 2b-c).
# MPNet's trick: each sample's patches are first gathered into its own permuted order, so the
# masks depend only on (objective, N, cut): one pair serves every batch. Content-stream layout:
#
#     [ CLS | cut visible patches | M targets, in permuted order | M mask tokens (mapet only) ]

@lru_cache(maxsize=None)
def build_masks(objective, num_patches, cut, device='cpu'):
    """(content_mask (L, L), query_mask (M, L)), bool, True = may attend.

    With r a target's rank in the permutation, every row sees CLS and the visible patches, and:
      content row of CLS / a visible patch / a mask token: all mask tokens (mapet)
      content row of target t: targets r <= r(t), mask tokens r > r(t) (mapet)
      query row of target t: targets r < r(t); mapet adds the mask tokens r >= r(t), the
        positions of t and of all later targets (Eq. 2); pim has t's position only (Eq. 1).
    """
    if objective not in ('pim', 'mapet'):
        raise ValueError(f'build_masks is for the two-stream objectives pim and mapet, not '
                         f'{objective!r}')
    check_cut(cut, num_patches)
    M = num_patches - cut
    C = 1 + cut  # CLS + visible: the context everyone sees
    L = 1 + num_patches + (M if objective == 'mapet' else 0)
    rank = torch.arange(M)
    earlier_or_self = rank[:, None] >= rank[None, :]  # (M, M): [t, u] = r(u) <= r(t)

    content = torch.zeros(L, L, dtype=torch.bool)
    content[:, :C] = True
    content[C:C + M, C:C + M] = earlier_or_self
    query = torch.zeros(M, L, dtype=torch.bool)
    query[:, :C] = True
    query[:, C:C + M] = earlier_or_self & ~torch.eye(M, dtype=torch.bool)  # strictly earlier
    if objective == 'mapet':
        tokens = slice(C + M, L)
        content[:C, tokens] = True
        content[C:C + M, tokens] = ~earlier_or_self  # mask tokens of later targets
        content[C + M:, tokens] = True
        query[:, tokens] = ~earlier_or_self | torch.eye(M, dtype=torch.bool)  # own and later
    return content.to(device), query.to(device)


def check_cut(cut, num_patches):
    if not isinstance(cut, int) or not 1 <= cut <= num_patches - 1:
        raise ValueError(f'cut must be an integer in 1..{num_patches - 1} (visible patches, CLS '
                         f'excluded; paper c = cut + 1), got {cut!r}')


# Input masks of the corruption objectives (Sec. 3 "MIM", Sec. 5.1 "BEiT").

def random_mask(batch, num_patches, num_masked, device=None, generator=None):
    """(B, N) bool, True = masked: exactly num_masked uniformly random patches per sample."""
    scores = torch.rand(batch, num_patches, device=device, generator=generator)
    return scores.argsort(dim=1).argsort(dim=1) < num_masked


def block_mask(grid, num_masked, generator=None, min_block=16, min_aspect=0.3):
    """(G*G,) bool, True = masked: BEiT's block-wise masking, exactly num_masked patches.

    Random rectangles are added while they fit; then the region grows to the exact count.
    """
    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=generator).item()

    mask = torch.zeros(grid, grid, dtype=torch.bool)
    misses = 0
    while mask.sum() < num_masked and misses < 10:
        remaining = num_masked - int(mask.sum())
        area = uniform(min(min_block, remaining), remaining)
        aspect = math.exp(uniform(math.log(min_aspect), math.log(1 / min_aspect)))
        h = min(grid, max(1, round(math.sqrt(area * aspect))))
        w = min(grid, max(1, round(math.sqrt(area / aspect))))
        top = int(torch.randint(0, grid - h + 1, (), generator=generator))
        left = int(torch.randint(0, grid - w + 1, (), generator=generator))
        new = int((~mask[top:top + h, left:left + w]).sum())
        if 0 < new <= remaining:
            mask[top:top + h, left:left + w] = True
            misses = 0
        else:
            misses += 1
    while mask.sum() < num_masked:  # grow: mask a random unmasked neighbour of the region
        grown = F.max_pool2d(mask[None, None].float(), 3, stride=1, padding=1)[0, 0].bool()
        frontier = (grown & ~mask).flatten().nonzero().flatten()
        if len(frontier) == 0:
            frontier = (~mask).flatten().nonzero().flatten()
        pick = frontier[torch.randint(0, len(frontier), (), generator=generator)]
        mask.view(-1)[pick] = True
    return mask.flatten()


# Pre-training: the backbone, a mask token and a token decoder.

class Pretrainer(nn.Module):
    """A ViT with a pre-training objective: forward(images, tokens) -> (logits, loss).

    tokens (B, N) or (B, G, G): each patch's visual token, raster order. Drawn when None:
    mim / beit / cae: `mask` (B, N) bool, True = masked, as many per sample; logits (B, Mm, K)
      for the masked patches in raster order.
    pim / mapet: `perm` (B, N), patches perm[:, :cut] visible; logits (B, M, K), logits[:, t]
      for patch perm[:, cut + t].
    drop_draws (B, depth; cae: + 2 cae_depth, its regressor and decoder blocks): see DropPath.
    """

    def __init__(self, backbone, objective, vocab_size=8192, cut=None, mask_ratio=0.4):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f'unknown objective {objective!r}: choose one of '
                             f'{", ".join(OBJECTIVES)}')
        if not 0 < mask_ratio < 1:
            raise ValueError(f'mask_ratio must be in (0, 1), got {mask_ratio}')
        N, D = backbone.num_patches, backbone.embed_dim
        self.backbone, self.objective, self.vocab_size = backbone, objective, vocab_size
        self.num_patches, self.grid = N, backbone.patch_embed.grid
        # Default: 30% visible, the paper's best reconstruction ratio (Tab. 6: c = 60 of 196).
        self.cut = round(0.3 * N) if cut is None else cut
        check_cut(self.cut, N)
        # BEiT masks 75 of 196 patches (~0.4); the same ratio scales to other grids. CAE: 50 %.
        self.num_masked = max(1, min(N - 1, round((0.5 if objective == 'cae' else mask_ratio) * N)))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.decoder = nn.Linear(D, vocab_size)  # the softmax classifier of Eq. 1-2
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        init_weights(self.decoder)
        # CAE's regressor and decoder as in the authors' code (Atten4Vis/CAE, cae_base_300e.sh):
        # 4 + 4 blocks of the encoder's width and heads for ViT-B/L, drop path rising to its rate;
        # 4 of 12 scales as depth // 3 (micro: 1 + 1).
        self.cae_depth = max(1, backbone.config['depth'] // 3) if objective == 'cae' else 0
        if self.cae_depth:
            c = backbone.config
            rates = torch.linspace(0, c['drop_path_rate'], self.cae_depth, device='cpu').tolist()
            self.regressor, self.latent_decoder = (nn.ModuleList(
                Block(D, c['num_heads'], c['mlp_ratio'], c['layer_scale'], rate) for rate in rates
            ).apply(init_weights) for _ in range(2))
            # the encoder's output norm (timm's ViT has none) and the regressor's
            self.encoder_norm, self.regressor_norm = (nn.LayerNorm(D, eps=1e-6) for _ in range(2))

    @property
    def two_stream(self):
        return self.objective in ('pim', 'mapet')

    # The random parts, public so a training loop can draw them itself.
    def draw_perm(self, batch, device=None):
        return torch.rand(batch, self.num_patches, device=device).argsort(dim=1)

    def draw_mask(self, batch, device=None):
        if self.objective in ('beit', 'cae'):
            masks = [block_mask(self.grid, self.num_masked) for _ in range(batch)]
            return torch.stack(masks).to(device)
        return random_mask(batch, self.num_patches, self.num_masked, device=device)

    def draw_drop(self, batch, device=None):
        return torch.rand(batch, len(self.backbone.blocks) + 2 * self.cae_depth, device=device)

    def forward(self, images, tokens, perm=None, mask=None, drop_draws=None):
        B, device = images.shape[0], images.device
        self.check_tokens(tokens, B)
        if self.two_stream:
            perm = self.draw_perm(B, device) if perm is None else perm
            hidden = self.forward_two_stream(images, perm, drop_draws)
        else:
            mask = self.draw_mask(B, device) if mask is None else mask
            counts = mask.sum(dim=1)
            if not (counts == counts[0]).all() or counts[0] == 0:
                raise ValueError('every sample must mask the same, non-zero number of patches')
            if self.objective == 'cae':
                return self.forward_cae(images, tokens, mask, drop_draws)
            hidden = self.forward_masked(images, mask, drop_draws)
        return self.forward_loss(hidden, self.targets_for(tokens, perm, mask))

    def check_tokens(self, tokens, batch):
        tokens = tokens.reshape(tokens.shape[0], -1)
        if tokens.shape != (batch, self.num_patches):
            raise ValueError(f'tokens have shape {tuple(tokens.shape)}, expected ({batch}, '
                             f'{self.num_patches}): tokenize at the model\'s {self.grid}x'
                             f'{self.grid} grid')
        outside = (tokens < 0) | (tokens >= self.vocab_size)
        if not torch.compiler.is_compiling() and outside.any():  # would split a compiled graph
            raise ValueError(f'tokens outside the vocabulary 0..{self.vocab_size - 1} (max '
                             f'{int(tokens.max())}): set vocab_size to the token file\'s')

    def forward_masked(self, images, mask, drop_draws=None):
        """MIM / BEiT (Fig. 1a): corrupted image -> (B, Mm, D) at the masked patches."""
        bb = self.backbone
        patches = bb.patch_embed(images)  # (B, N, D)
        patches = torch.where(mask[..., None], self.mask_token.to(patches.dtype), patches)
        x = bb.run_blocks(bb.embed(patches), drop_draws)  # (B, 1+N, D)
        return x[:, 1:][mask].view(len(x), -1, x.shape[-1])

    def forward_two_stream(self, images, perm, drop_draws=None):
        """PIM / MaPeT (Fig. 2): streams h and g through shared blocks -> g (B, M, D)."""
        bb, cut = self.backbone, self.cut
        x = bb.embed(bb.patch_embed(images))  # (B, 1+N, D)
        index = perm[..., None].expand(-1, -1, x.shape[-1])
        patches = x[:, 1:].gather(1, index)  # permuted
        # gather, not pos_embed[perm]: its backward (scatter-add) is deterministic on a CPU.
        target_pos = bb.pos_embed[:, 1:].expand(len(perm), -1, -1).gather(1, index[:, cut:])
        # Position-aware mask tokens (Sec. 4.1) start g; mapet also appends them to h (Eq. 2).
        g = self.mask_token + target_pos  # (B, M, D)
        h = torch.cat([x[:, :1], patches] + ([g] if self.objective == 'mapet' else []), dim=1)
        content_mask, query_mask = build_masks(self.objective, self.num_patches, cut, h.device)
        both_masks = torch.cat([content_mask, query_mask])  # (L+M, L)
        drops = bb.drops_per_block(len(h), drop_draws, h.device)
        for block, block_drops in zip(bb.blocks[:-1], drops):
            h, g = bb.run_block(block.two_stream, h, g, both_masks, block_drops)
        # Only g is read by the loss: the last block updates g alone, from h's keys and values.
        return bb.run_block(bb.blocks[-1], g, h, query_mask, drops[-1])

    def forward_cae(self, images, tokens, mask, drop_draws=None):
        """CAE (Chen et al. 2022, Sec. 3): the encoder sees the visible patches only, a regressor
        predicts the masked ones' latents, a decoder their tokens -> (logits, CE + 2 x MSE)."""
        bb, B, D = self.backbone, len(images), self.backbone.embed_dim
        x = bb.embed(bb.patch_embed(images))  # (B, 1+N, D), positions added
        pos = bb.pos_embed[:, 1:].expand(B, -1, -1)  # (B, N, D)
        draws, heads = self.cae_drops(B, drop_draws, images.device)

        def encode(keep):  # CLS + the patches `keep` selects -> their latents (B, n, D)
            x_in = x[torch.cat([keep.new_ones(B, 1), keep], 1)].view(B, -1, D)
            return self.encoder_norm(bb.run_blocks(x_in, draws)[:, 1:])

        visible, masked_pos = encode(~mask), pos[mask].view(B, -1, D)
        with torch.no_grad():  # the alignment target: the masked patches alone, encoded
            target = encode(mask)  # (B, Mm, D)
        # Queries: mask token + position; keys and values: the visible latents (+ positions, once,
        # not per block as CAE's code) and, as in CAE, the queries, which hold no masked content.
        context, q = visible + pos[~mask].view(B, -1, D), self.mask_token + masked_pos
        for block, block_drops in zip(self.regressor, heads[:self.cae_depth], strict=True):
            q = bb.run_block(block, q, torch.cat([context, q], 1), None, block_drops)
        latent = self.regressor_norm(q)  # (B, Mm, D)
        h = latent + masked_pos  # the decoder: self-attention over the predictions only
        for block, block_drops in zip(self.latent_decoder, heads[self.cae_depth:], strict=True):
            h = bb.run_block(block, h, None, None, block_drops)
        logits, loss = self.forward_loss(h, self.targets_for(tokens, mask=mask))
        return logits, loss + 2 * F.mse_loss(latent.float(), target.float())

    def cae_drops(self, batch, drop_draws, device):
        """The encoder's draws (B, depth), a (B,) column per regressor / decoder block; or None."""
        if not self.training or self.backbone.config['drop_path_rate'] == 0:
            return None, [None] * 2 * self.cae_depth
        draws = self.draw_drop(batch, device) if drop_draws is None else drop_draws
        depth = len(self.backbone.blocks)
        return draws[:, :depth], draws[:, depth:].unbind(1)

    def forward_loss(self, hidden, targets):
        """Eq. 1-2: hidden (B, M, D) -> (logits (B, M, K), cross-entropy with targets (B, M))."""
        logits = self.decoder(self.norm(hidden))
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def targets_for(self, tokens, perm=None, mask=None):
        """The tokens that logits[:, j] predict: (B, M)."""
        tokens = tokens.reshape(tokens.shape[0], -1).long()
        if self.two_stream:
            return tokens.gather(1, perm[:, self.cut:])
        return tokens[mask].view(tokens.shape[0], -1)
