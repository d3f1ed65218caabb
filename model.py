"""The Vision Transformer, the two-stream attention masks, and the four pre-training objectives.

Paper: Baraldi et al., "Learning to Mask and Permute Visual Tokens for Vision Transformer
Pre-Training" (MaPeT), Sec. 3 (MIM, PIM), Sec. 4.1 (MaPeT, two-stream attention), Fig. 1-2,
Eq. 1-3. Every objective predicts the discrete visual token of some patches (Sec. 3, "Visual
tokens") with a linear classifier over the vocabulary:

    mim    random patches replaced by a mask token, predicted from the corrupted image (Fig. 1a)
    beit   as mim, with BEiT's block-wise masking
    pim    patches permuted, the last M predicted autoregressively by a query stream (Eq. 1, Fig. 1b)
    mapet  pim + position-aware mask tokens for all targets in the content stream (Eq. 2, Fig. 1c, 2)

The backbone is a plain ViT whose state dict is timm's (global_pool='avg', init_values=0.1), so
a fine-tuned checkpoint loads into `timm.create_model('vit_small_patch16_224', ...)` unchanged.

    from model import create_model, Pretrainer
    pre = Pretrainer(create_model('tiny'), 'mapet', vocab_size=8192)
    logits, loss = pre(images, tokens)           # images [B, 3, 224, 224], tokens [B, 196]
    classifier = pre.backbone                    # a standard ViT: classifier(images) -> [B, classes]

Shape letters: B batch, N patches, M targets, L content-stream length, D width, H heads,
K vocabulary, G grid side.
"""
import math
from functools import lru_cache

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

OBJECTIVES = ('mim', 'beit', 'pim', 'mapet')

# ----------------------------------------------------------------------------------------------
# The ViT backbone (Sec. 3, "Image patches"), in timm's parameter layout.

MODEL_CONFIGS = {
    # A CPU-sized ViT for the built-in 32 px demo images: patch 4 gives an 8x8 grid (N = 64).
    'micro': dict(img_size=32, patch_size=4, embed_dim=128, depth=6, num_heads=4),
    # Tab. 7: hidden size 192 / 384 / 768, FFN 4x, heads of size 64, 12 layers, patch 16, 224 px.
    'tiny': dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3),
    'small': dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    'base': dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
}


class PatchEmbed(nn.Module):
    """Cut the image into P x P patches and project each to D dimensions (one strided conv)."""

    def __init__(self, img_size, patch_size, embed_dim):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f'img_size {img_size} is not a multiple of patch_size {patch_size}')
        self.img_size, self.patch_size = img_size, patch_size
        self.grid = img_size // patch_size
        self.num_patches = self.grid ** 2
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images):
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.img_size,) * 2:
            raise ValueError(f'images have shape {tuple(images.shape)}, the model expects '
                             f'[B, 3, {self.img_size}, {self.img_size}]: resize the images or build '
                             f'the model with img_size={images.shape[-1]}')
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, N, D), raster order


class Attention(nn.Module):
    """Multi-head self-attention that can also serve XLNet's two streams in one call (Eq. 3).

    Rows x[:, :kv_len] are the content stream: they alone are projected to keys and values.
    Every row from `first_query_row` on is projected to a query and gets an output row, so the
    content and query streams share one `scaled_dot_product_attention` call with one mask.
    """

    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'embed_dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def project(self, x, kv_len, first_query_row):
        """q (B, H, T', hd) for rows first_query_row.., k and v (B, H, kv_len, hd)."""
        B, T, D = x.shape
        H = self.num_heads
        if kv_len == T and first_query_row == 0:  # plain ViT: one fused projection
            q, k, v = self.qkv(x).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
            return q, k, v
        # Two streams: queries for the output rows only; keys/values never for query-stream rows.
        w_q, w_kv = self.qkv.weight.split([D, 2 * D])
        b_q, b_kv = self.qkv.bias.split([D, 2 * D])
        q = F.linear(x[:, first_query_row:], w_q, b_q)
        q = q.view(B, T - first_query_row, H, D // H).transpose(1, 2)  # (B, H, T', hd)
        # x[:, :kv_len] is a strided view: F.linear would copy it (and keep the copy for backward);
        # a batched matmul reads it in place (-3% of a ViT-T MaPeT step's memory).
        kv = torch.baddbmm(b_kv, x[:, :kv_len], w_kv.T.expand(B, D, 2 * D))  # (B, kv_len, 2D)
        k, v = kv.view(B, kv_len, 2, H, D // H).permute(2, 0, 3, 1, 4)  # (B, H, kv_len, hd) each
        return q, k, v

    def forward(self, x, attn_mask=None, kv_len=None, first_query_row=0):
        B, T, D = x.shape
        q, k, v = self.project(x, T if kv_len is None else kv_len, first_query_row)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, T', hd)
        return self.proj(out.transpose(1, 2).reshape(B, T - first_query_row, D))

    def attention_weights(self, x):
        """The softmax attention matrix (B, H, T, T) of a plain (unmasked) pass, for pictures."""
        q, k, _ = self.project(x, x.shape[1], 0)
        return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual scale (CaiT), initialised to 0.1 (Tab. 7, "Layer scale")."""

    def __init__(self, dim, init_value):
        super().__init__()
        self.gamma = nn.Parameter(init_value * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch. One draw per sample, so both
    streams of a sample (rows of the same tensor) are dropped together."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty(x.shape[0], 1, 1).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm Transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, dim, num_heads, mlp_ratio, layer_scale, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layer_scale)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, attn_mask=None, kv_len=None, first_query_row=0):
        """Rows before `first_query_row` only serve as keys/values and are not returned: the last
        two-stream block computes the query stream alone, the one thing the loss reads."""
        attended = self.attn(self.norm1(x), attn_mask, kv_len, first_query_row)
        x = x[:, first_query_row:] + self.drop_path(self.ls1(attended))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    """ViT with a CLS token, learned absolute position embeddings, layer scale, stochastic depth;
    classification from the mean of the patch tokens -> fc_norm -> head (Sec. 5.1)."""

    def __init__(self, img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, num_classes=0, drop_path_rate=0.1, layer_scale=0.1):
        super().__init__()
        self.config = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                           num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=num_classes,
                           drop_path_rate=drop_path_rate, layer_scale=layer_scale)
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # deeper blocks dropped more often
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, layer_scale, r) for r in rates)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False  # recompute activations in backward to save memory
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights)

    def embed(self, images):
        """Patch embeddings + their position embeddings (B, N, D), and the CLS row (B, 1, D)."""
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return x, cls

    def run_block(self, block, x, attn_mask=None, kv_len=None, first_query_row=0):
        if self.grad_checkpointing and self.training:
            return checkpoint(block, x, attn_mask, kv_len, first_query_row, use_reentrant=False)
        return block(x, attn_mask, kv_len, first_query_row)

    def forward_features(self, images):
        """All tokens after the last block: (B, 1+N, D), CLS first."""
        x, cls = self.embed(images)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = self.run_block(block, x)
        return x

    def pool(self, features):
        """Image representation: mean of the patch tokens (not CLS) -> fc_norm (Sec. 5.1)."""
        return self.fc_norm(features[:, 1:].mean(dim=1))

    def forward(self, images):
        return self.head(self.pool(self.forward_features(images)))  # (B, classes)

    @torch.no_grad()
    def get_intermediate_layers(self, images, n=1):
        """The outputs (B, 1+N, D) of the last n blocks, oldest first (for probes and pictures)."""
        x, cls = self.embed(images)
        x, outputs = torch.cat([cls, x], dim=1), []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs[-n:]

    @torch.no_grad()
    def get_attention_maps(self, images, layer=-1):
        """Attention weights (B, H, 1+N, 1+N) of one block, for pictures."""
        x, cls = self.embed(images)
        x = torch.cat([cls, x], dim=1)
        index = range(len(self.blocks))[layer]
        for block in self.blocks[:index]:
            x = block(x)
        return self.blocks[index].attn.attention_weights(self.blocks[index].norm1(x))


def init_weights(module):
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def create_model(name, **overrides):
    """A ViT by size name ('micro', 'tiny', 'small', 'base'); keywords override the config."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f'unknown model {name!r}: choose one of {", ".join(MODEL_CONFIGS)}')
    return VisionTransformer(**{**MODEL_CONFIGS[name], **overrides})


def vit_micro(**overrides):
    return create_model('micro', **overrides)


def vit_tiny(**overrides):
    return create_model('tiny', **overrides)


def vit_small(**overrides):
    return create_model('small', **overrides)


def vit_base(**overrides):
    return create_model('base', **overrides)


# ----------------------------------------------------------------------------------------------
# Attention masks of the two-stream objectives (Sec. 4.1 "Attention masking", Fig. 2b-c).
#
# MPNet's trick: each sample's patches are gathered into its own permuted order first, so the
# masks no longer depend on the permutation, only on (objective, N, cut). One pair serves the
# whole batch and every step. Content-stream layout (rows and key columns):
#
#     [ CLS | cut visible patches | M targets, in permuted order | M mask tokens (mapet only) ]
#
# and the query stream has one row per target. True = may attend.

@lru_cache(maxsize=None)
def build_masks(objective, num_patches, cut, device='cpu'):
    """(content_mask (L, L), query_mask (M, L)), boolean, True = may attend; cached per shape.

    With r the rank of a target in the permutation (0 = first target):
      content row of CLS / a visible patch: CLS, visible patches, all mask tokens (mapet)
      content row of target t: CLS, visible, targets r <= r(t), mask tokens r > r(t) (mapet)
      content row of mask token t (mapet): CLS, visible, all mask tokens
      query row of target t: CLS, visible, targets r < r(t), and for mapet the mask tokens
        r >= r(t), its own included: its own position and those of all later targets (Eq. 2).
    In pim the query row sees no mask token: only its own position, through its input (Eq. 1).
    """
    if objective not in ('pim', 'mapet'):
        raise ValueError(f'build_masks is for the two-stream objectives pim and mapet, got '
                         f'{objective!r} (mim and beit attend to every token)')
    check_cut(cut, num_patches)
    M = num_patches - cut
    C = 1 + cut                                  # CLS + visible: the context everyone sees
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
        content[C:C + M, tokens] = ~earlier_or_self              # mask tokens of later targets
        content[C + M:, tokens] = True
        query[:, tokens] = ~earlier_or_self | torch.eye(M, dtype=torch.bool)  # own and later
    return content.to(device), query.to(device)


def check_cut(cut, num_patches):
    if not isinstance(cut, int) or not 1 <= cut <= num_patches - 1:
        raise ValueError(f'cut must be an integer in 1..{num_patches - 1} (visible patches, CLS '
                         f'excluded; paper c = cut + 1), got {cut!r}')


# ----------------------------------------------------------------------------------------------
# Input masks of the corruption objectives (Sec. 3 "MIM", Sec. 5.1 "BEiT").

def random_mask(batch, num_patches, num_masked, device=None, generator=None):
    """(B, N) bool, True = masked: exactly num_masked uniformly random patches per sample."""
    scores = torch.rand(batch, num_patches, device=device, generator=generator)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return ranks < num_masked


def block_mask(grid, num_masked, generator=None, min_block=16, min_aspect=0.3):
    """(G*G,) bool, True = masked: BEiT's block-wise masking, exactly num_masked patches.

    Rectangles of at least `min_block` patches (fewer when less remains), aspect ratio in
    [min_aspect, 1/min_aspect], are added while they fit in the remaining budget; whatever
    budget is left is spent growing the masked region by neighbouring patches, so the count is
    exact and the mask stays blocky.
    """
    if not 0 < num_masked < grid * grid:
        raise ValueError(f'num_masked must be in 1..{grid * grid - 1}, got {num_masked}')
    g = generator if generator is not None else torch.default_generator
    uniform = lambda lo, hi: lo + (hi - lo) * torch.rand((), generator=g).item()
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    misses = 0
    while mask.sum() < num_masked and misses < 10:
        remaining = num_masked - int(mask.sum())
        area = uniform(min(min_block, remaining), remaining)
        aspect = math.exp(uniform(*log_aspect))
        h = min(grid, max(1, round(math.sqrt(area * aspect))))
        w = min(grid, max(1, round(math.sqrt(area / aspect))))
        top = int(torch.randint(0, grid - h + 1, (), generator=g))
        left = int(torch.randint(0, grid - w + 1, (), generator=g))
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
        pick = frontier[torch.randint(0, len(frontier), (), generator=g)]
        mask.view(-1)[pick] = True
    return mask.flatten()


# ----------------------------------------------------------------------------------------------
# Pre-training: the backbone plus what only pre-training needs (mask token, token decoder).

class Pretrainer(nn.Module):
    """A ViT with a pre-training objective: forward(images, tokens) -> (logits, loss).

    mim / beit: `mask` (B, N) bool, True = masked, the same count in every sample (drawn when
      None: uniformly at `mask_ratio`, or BEiT's blocks of round(mask_ratio * N) patches). Masked
      patch embeddings are replaced by the mask token. logits (B, Mm, K) are for the masked
      patches only, in raster order: logits[b, j] predicts the j-th masked patch of sample b.
    pim / mapet: `perm` (B, N), one permutation of 0..N-1 per sample (uniform when None). The
      first `cut` permuted patches are visible, the other M = N - cut are targets; logits
      (B, M, K) with logits[:, t] predicting the token of patch perm[:, cut + t].
    tokens (B, N) or (B, G, G): the visual token of every patch, raster order. Loss: mean
    cross-entropy over all predicted patches.
    """

    def __init__(self, backbone, objective, vocab_size=8192, cut=None, mask_ratio=0.4):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f'unknown objective {objective!r}: choose one of {", ".join(OBJECTIVES)}')
        if not 0 < mask_ratio < 1:
            raise ValueError(f'mask_ratio must be in (0, 1), got {mask_ratio}')
        N, D = backbone.num_patches, backbone.embed_dim
        self.backbone, self.objective, self.vocab_size = backbone, objective, vocab_size
        self.num_patches, self.grid = N, backbone.patch_embed.grid
        # Default cut: 30% visible, the paper's best reconstruction ratio (Tab. 6: c = 60 of 196).
        self.cut = round(0.3 * N) if cut is None else cut
        check_cut(self.cut, N)
        # BEiT masks 75 of 196 patches (~0.4); the same ratio scales to other grids.
        self.num_masked = max(1, min(N - 1, round(mask_ratio * N)))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.norm = nn.LayerNorm(D, eps=1e-6)      # in front of the token classifier
        self.decoder = nn.Linear(D, vocab_size)    # the softmax classifier of Eq. 1-2
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        init_weights(self.norm)
        init_weights(self.decoder)

    @property
    def two_stream(self):
        return self.objective in ('pim', 'mapet')

    # The random part of each objective, public so a training loop can draw it itself.
    def draw_perm(self, batch, device=None):
        return torch.rand(batch, self.num_patches, device=device).argsort(dim=1)

    def draw_mask(self, batch, device=None):
        if self.objective == 'beit':
            return torch.stack([block_mask(self.grid, self.num_masked) for _ in range(batch)]).to(device)
        return random_mask(batch, self.num_patches, self.num_masked, device=device)

    def forward(self, images, tokens, perm=None, mask=None):
        B = images.shape[0]
        tokens = self.check_tokens(tokens, B)
        if self.two_stream:
            perm = self.draw_perm(B, images.device) if perm is None else perm
            if perm.shape != (B, self.num_patches):
                raise ValueError(f'perm has shape {tuple(perm.shape)}, expected ({B}, {self.num_patches})')
            hidden = self.forward_two_stream(images, perm)
            targets = tokens.gather(1, perm[:, self.cut:])                         # (B, M)
        else:
            mask = self.draw_mask(B, images.device) if mask is None else mask
            hidden, masked_index = self.forward_masked(images, mask)
            targets = tokens.gather(1, masked_index)                               # (B, Mm)
        logits = self.decoder(self.norm(hidden))                                   # (B, M, K)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def check_tokens(self, tokens, batch):
        tokens = tokens.reshape(tokens.shape[0], -1) if tokens.ndim == 3 else tokens
        if tokens.shape != (batch, self.num_patches):
            raise ValueError(f'tokens have shape {tuple(tokens.shape)}, expected ({batch}, '
                             f'{self.num_patches}): one token per patch of a {self.grid}x{self.grid} '
                             'grid; tokenize at the grid the model uses')
        # A data-dependent check: it would split a torch.compile graph, so compiled steps skip it
        # (pretrain.py takes the vocabulary from the token file itself).
        if not torch.compiler.is_compiling() and bool(((tokens < 0) | (tokens >= self.vocab_size)).any()):
            raise ValueError(f'tokens outside the vocabulary 0..{self.vocab_size - 1} (max '
                             f'{int(tokens.max())}): set vocab_size to the token file\'s vocabulary')
        return tokens.long()

    def forward_masked(self, images, mask):
        """MIM / BEiT (Fig. 1a): a standard ViT pass over the corrupted image."""
        B, N = mask.shape[0], self.num_patches
        if mask.shape != (images.shape[0], N) or mask.dtype != torch.bool:
            raise ValueError(f'mask must be a bool tensor of shape ({images.shape[0]}, {N})')
        counts = mask.sum(dim=1)
        num_masked = int(counts[0])
        if not bool((counts == num_masked).all()) or num_masked == 0:
            raise ValueError('every sample must mask the same, non-zero number of patches')
        bb = self.backbone
        patches = bb.patch_embed(images)
        patches = torch.where(mask[..., None], self.mask_token.to(patches.dtype), patches)
        cls = (bb.cls_token + bb.pos_embed[:, :1]).expand(B, -1, -1)
        x = torch.cat([cls, patches + bb.pos_embed[:, 1:]], dim=1)                 # (B, 1+N, D)
        for block in bb.blocks:
            x = bb.run_block(block, x)
        # Indices of the masked patches in raster order: a stable sort puts them first.
        masked_index = mask.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :num_masked]
        hidden = x[:, 1:].gather(1, masked_index[..., None].expand(-1, -1, x.shape[-1]))
        return hidden, masked_index                                                # (B, Mm, D)

    def forward_two_stream(self, images, perm):
        """PIM / MaPeT (Fig. 2): content stream h and query stream g through shared blocks."""
        bb, cut = self.backbone, self.cut
        B, N, D = perm.shape[0], self.num_patches, bb.embed_dim
        x, cls = bb.embed(images)                                                  # (B, N, D)
        index = perm[..., None].expand(-1, -1, D)
        x = x.gather(1, index)                                   # patches in permuted order
        target_pos = bb.pos_embed[:, 1:].expand(B, -1, -1).gather(1, index)[:, cut:]  # (B, M, D)
        # Position-aware mask tokens: the shared mask token + each target's position (Sec. 4.1).
        position_aware = self.mask_token + target_pos                              # (B, M, D)
        content = [cls, x] + ([position_aware] if self.objective == 'mapet' else [])
        h = torch.cat(content, dim=1)                                              # (B, L, D)
        L = h.shape[1]
        content_mask, query_mask = build_masks(self.objective, N, cut, h.device)
        both_masks = torch.cat([content_mask, query_mask])                         # (L+M, L)
        # One attention call per block for both streams (Eq. 3): queries from [h; g], keys and
        # values from h alone. The query stream starts as the position-aware mask tokens.
        x = torch.cat([h, position_aware], dim=1)                                  # (B, L+M, D)
        for block in bb.blocks[:-1]:
            x = bb.run_block(block, x, both_masks, L)
        # The content stream's last output is never read: the last block computes g alone.
        return bb.run_block(bb.blocks[-1], x, query_mask, L, L)                    # (B, M, D)

    def targets_for(self, tokens, perm=None, mask=None):
        """The tokens that logits[:, j] predict, for accuracy: (B, M)."""
        tokens = tokens.reshape(tokens.shape[0], -1).long()
        if self.two_stream:
            return tokens.gather(1, perm[:, self.cut:])
        return tokens[mask].view(tokens.shape[0], -1)
