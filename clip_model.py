"""OpenAI CLIP with ResNet image towers, written compactly; loads OpenAI's checkpoints unchanged.

k-CLIP (paper Sec. 4.2) makes the visual tokens MaPeT predicts by clustering the features of
the last convolutional stage (`layer4`) of a CLIP ResNet, one feature per ViT patch.
`tokenizer.py` calls `load(name_or_path, device)` and then `model.encode_dense(x)` on images
normalised with IMAGE_MEAN / IMAGE_STD at 32*G px, giving a GxG feature grid (448 px -> 14x14).
The paper used RN50x64 (C = 4096 channels); this project defaults to RN50 (C = 2048).

Top to bottom: the BPE text tokenizer (ftfy + regex, byte-level BPE over the vocabulary file
`bpe_simple_vocab_16e6.txt.gz` next to this file); the ModifiedResNet (3-conv stem,
anti-aliased Bottleneck blocks, attention pooling); the causal text transformer; CLIP; load().
State-dict keys are exactly OpenAI's (`visual.layer1.0.conv1.weight`,
`transformer.resblocks.0.attn.in_proj_weight`, ...) and the architecture is read from the
tensor shapes, so an OpenAI checkpoint loads with strict=True. ViT checkpoints are refused:
k-CLIP needs a convolutional last stage.

    import clip_model
    model = clip_model.load('RN50')                    # downloads to ~/.cache/clip ($CLIP_CACHE)
    model = clip_model.load('RN50x64.pt', 'cuda').half()   # a local file: no network
    feats = model.encode_dense(x)                      # (B, 3, 448, 448) -> (B, 2048, 14, 14)
    logits_per_image, logits_per_text = model(x224, clip_model.tokenize(['a dog', 'a cat']))

Offline, the error message names the URL and the path to save the file at by hand.
Test: python -m pytest -q tests/test_clip_model.py
"""
import gzip
import hashlib
import html
import math
import os
import pickle
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import ftfy
import regex
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's training-set pixel statistics (RGB)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# OpenAI's release; the SHA-256 of each file is the second-to-last component of its URL.
MODELS = {
    'RN50': 'https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt',
    'RN101': 'https://openaipublic.azureedge.net/clip/models/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt',
    'RN50x4': 'https://openaipublic.azureedge.net/clip/models/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt',
    'RN50x16': 'https://openaipublic.azureedge.net/clip/models/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt',
    'RN50x64': 'https://openaipublic.azureedge.net/clip/models/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt',
}

# ----------------------------------------------------------------------------- text tokenizer

VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bpe_simple_vocab_16e6.txt.gz')
SOT, EOT = '<|startoftext|>', '<|endoftext|>'
# Pre-tokens: special tokens, English contractions, letter runs, single digits, punctuation runs.
_PRETOKEN = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                          regex.IGNORECASE)


def _byte_alphabet() -> dict[int, str]:
    """One printable character per byte value, so BPE runs on strings without whitespace or
    control characters and any UTF-8 text is representable (no unknown token)."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)  # the remaining bytes borrow unused code points
    return table  # insertion order is the order of the first 256 vocabulary ids


class BPETokenizer:
    """CLIP's lower-cased byte-level BPE (vocabulary 49408 = 256 bytes x 2 + 48894 merges + 2 special)."""

    def __init__(self, path: str = VOCAB_PATH):
        self.byte_char = _byte_alphabet()
        lines = gzip.open(path).read().decode('utf-8').split('\n')
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # line 0: version header
        chars = list(self.byte_char.values())
        vocab = chars + [c + '</w>' for c in chars] + [''.join(m) for m in merges] + [SOT, EOT]
        self.encoder = {piece: i for i, piece in enumerate(vocab)}
        self.rank = {pair: i for i, pair in enumerate(merges)}  # lower rank = merged earlier in training
        self.cache = {SOT: [SOT], EOT: [EOT]}

    def bpe(self, word: str) -> list[str]:
        """Split one pre-token into vocabulary pieces by merging its best-ranked adjacent pair until none is known."""
        if word not in self.cache:
            parts = [*word[:-1], word[-1] + '</w>']  # '</w>' marks the end of a word
            while len(parts) > 1:
                best = min(zip(parts, parts[1:]), key=lambda pair: self.rank.get(pair, math.inf))
                if best not in self.rank:
                    break
                merged, i = [], 0
                while i < len(parts):  # merge every occurrence, left to right, without overlap
                    if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                        merged.append(parts[i] + parts[i + 1])
                        i += 2
                    else:
                        merged.append(parts[i])
                        i += 1
                parts = merged
            self.cache[word] = parts
        return self.cache[word]

    def encode(self, text: str) -> list[int]:
        text = html.unescape(html.unescape(ftfy.fix_text(text)))  # mojibake, then '&amp;amp;' -> '&'
        text = regex.sub(r'\s+', ' ', text).strip().lower()
        ids = []
        for pretoken in _PRETOKEN.findall(text):
            word = ''.join(self.byte_char[b] for b in pretoken.encode('utf-8'))
            ids += [self.encoder[piece] for piece in self.bpe(word)]
        return ids


@lru_cache(maxsize=1)
def _tokenizer() -> BPETokenizer:
    return BPETokenizer()


def tokenize(texts: str | list[str], context_length: int = 77, truncate: bool = False) -> torch.Tensor:
    """Texts -> (B, context_length) int64 ids: <|startoftext|> text <|endoftext|>, zero-padded.
    Too long: RuntimeError, or with truncate=True cut and end with <|endoftext|> (same as clip.tokenize)."""
    texts = [texts] if isinstance(texts, str) else texts
    tok = _tokenizer()
    sot, eot = tok.encoder[SOT], tok.encoder[EOT]
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [sot, *tok.encode(text), eot]
        if len(ids) > context_length:
            if not truncate:
                raise RuntimeError(f'Input {text} is too long for context length {context_length} '
                                   f'(pass truncate=True to cut it)')
            ids = ids[:context_length - 1] + [eot]
        out[i, :len(ids)] = torch.tensor(ids)
    return out

# ----------------------------------------------------------------------------- image tower


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 -> 1x1, 4x wider out). A stride is an average pool before
    the last 1x1 conv (and before the shortcut conv): anti-aliased downsampling."""
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        outplanes = planes * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3, self.bn3 = nn.Conv2d(planes, outplanes, 1, bias=False), nn.BatchNorm2d(outplanes)
        self.downsample = None
        if stride > 1 or inplanes != outplanes:  # keys downsample.0 (conv) and downsample.1 (bn)
            self.downsample = nn.Sequential(OrderedDict([
                ('pool', nn.AvgPool2d(stride) if stride > 1 else nn.Identity()),
                ('0', nn.Conv2d(inplanes, outplanes, 1, bias=False)), ('1', nn.BatchNorm2d(outplanes))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, 4*planes, H/s, W/s)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(self.avgpool(y)))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class AttentionPool2d(nn.Module):
    """Replaces global average pooling: the mean feature, as the single query, attends over
    itself and all GxG positions (learned positional embedding, so the grid size is fixed)."""

    def __init__(self, grid: int, dim: int, heads: int, output_dim: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, dim) / dim ** 0.5)
        self.k_proj, self.q_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, G, G) -> (B, E)
        B, C, Gh, Gw = x.shape
        if Gh * Gw + 1 != self.positional_embedding.shape[0]:
            side = 32 * round((self.positional_embedding.shape[0] - 1) ** 0.5)
            raise ValueError(f'encode_image needs {side}x{side} px input (the attention pool is sized for it), '
                             f'got {32 * Gh}x{32 * Gw}; encode_dense takes any size')
        x = x.flatten(2).transpose(1, 2)  # (B, G*G, C)
        x = torch.cat([x.mean(1, keepdim=True), x], 1) + self.positional_embedding.to(x.dtype)  # (B, 1+G*G, C)
        heads = lambda t: t.view(B, t.shape[1], self.heads, C // self.heads).transpose(1, 2)  # (B, H, L, C/H)
        y = F.scaled_dot_product_attention(heads(self.q_proj(x[:, :1])), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.c_proj(y.transpose(1, 2).reshape(B, C))


class ModifiedResNet(nn.Module):
    """ResNet-50-like tower: 3-conv stem with an average pool, four Bottleneck stages (the last
    one has 32*width channels at stride 32), attention pooling to the joint embedding."""

    def __init__(self, layers: tuple[int, int, int, int], output_dim: int, heads: int, input_resolution: int, width: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1, self.bn1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width // 2)
        self.conv2, self.bn2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False), nn.BatchNorm2d(width // 2)
        self.conv3, self.bn3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        stage = lambda inplanes, planes, blocks, stride: nn.Sequential(
            Bottleneck(inplanes, planes, stride), *[Bottleneck(planes * 4, planes) for _ in range(blocks - 1)])
        self.layer1 = stage(width, width, layers[0], 1)
        self.layer2 = stage(width * 4, width * 2, layers[1], 2)
        self.layer3 = stage(width * 8, width * 4, layers[2], 2)
        self.layer4 = stage(width * 16, width * 8, layers[3], 2)
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 32*width, H/32, W/32)
        x = F.relu(self.bn1(self.conv1(x)))  # stride 2
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(F.relu(self.bn3(self.conv3(x))))  # stride 4
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))  # strides 4, 8, 16, 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, R, R) -> (B, E)
        return self.attnpool(self.forward_dense(x))

# ----------------------------------------------------------------------------- text tower


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32, so a .half() model stays numerically stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that CLIP was trained with (not interchangeable with nn.GELU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where token t sees tokens <= t; parameters laid out as
    nn.MultiheadAttention's (in_proj_weight = [W_q; W_k; W_v]), which OpenAI's keys name."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.randn(3 * width, width) * width ** -0.5)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, L, D)
        B, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, L, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, D/H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn, self.ln_1 = CausalSelfAttention(width, heads), LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width)))
        self.ln_2 = LayerNorm(width)  # registration order gives OpenAI's state-dict key order

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, L, D), pre-norm residual
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)

# ----------------------------------------------------------------------------- CLIP


@dataclass
class CLIPConfig:  # defaults: RN50
    embed_dim: int = 1024  # joint image-text embedding E
    image_resolution: int = 224  # native input size R; the attention pool is sized for R/32
    vision_layers: tuple[int, int, int, int] = (3, 4, 6, 3)  # Bottleneck blocks per stage
    vision_width: int = 64  # stem width; layer4 has C = 32*width channels
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        # Head counts are not in the weights: OpenAI uses 64-dimensional heads in both towers.
        self.visual = ModifiedResNet(cfg.vision_layers, cfg.embed_dim, cfg.vision_width * 32 // 64,
                                     cfg.image_resolution, cfg.vision_width)
        self.transformer = Transformer(cfg.transformer_width, cfg.transformer_layers, cfg.transformer_heads)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.transformer_width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.context_length, cfg.transformer_width) * 0.01)
        self.ln_final = LayerNorm(cfg.transformer_width)
        self.text_projection = nn.Parameter(torch.randn(cfg.transformer_width, cfg.embed_dim) * cfg.transformer_width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # learned inverse temperature

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def input_resolution(self) -> int:
        return self.config.image_resolution

    def encode_dense(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, C, H/32, W/32)
        """The layer4 feature map before attention pooling (k-CLIP, Sec. 4.2): any H, W multiple of 32."""
        return self.visual.forward_dense(images.to(self.dtype))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, R, R) -> (B, E)
        return self.visual(images.to(self.dtype))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, L) int64 -> (B, E)
        x = self.token_embedding(tokens).to(self.dtype) + self.positional_embedding[:tokens.shape[1]].to(self.dtype)
        x = self.ln_final(self.transformer(x))  # (B, L, D)
        # <|endoftext|> has the largest id, so argmax finds it; under the causal mask it has read the whole text.
        return x[torch.arange(x.shape[0]), tokens.argmax(-1)] @ self.text_projection

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled cosine similarities: logits_per_image (B_img, B_txt) and its transpose."""
        img = F.normalize(self.encode_image(images), dim=-1)
        txt = F.normalize(self.encode_text(tokens), dim=-1)
        logits_per_image = self.logit_scale.exp() * img @ txt.t()
        return logits_per_image, logits_per_image.t()


def config_from_state_dict(sd: dict[str, torch.Tensor], source: str = 'checkpoint') -> CLIPConfig:
    """Read the architecture from tensor shapes and key counts, as OpenAI's build_model does."""
    if 'visual.proj' in sd or 'visual.class_embedding' in sd:
        raise SystemExit(f'{source} is a ViT CLIP model; only ResNet CLIP models ({", ".join(MODELS)}) are '
                         f'supported, since k-CLIP clusters the last convolutional stage')
    needed = ['visual.layer1.0.conv1.weight', 'visual.attnpool.positional_embedding', 'text_projection',
              'positional_embedding', 'token_embedding.weight', 'ln_final.weight']
    if missing := [k for k in needed if k not in sd]:
        raise SystemExit(f'{source} is not an OpenAI CLIP state dict (no {", ".join(missing)})')
    count = lambda prefix: len({k[len(prefix):].split('.')[0] for k in sd if k.startswith(prefix)})
    grid = round((sd['visual.attnpool.positional_embedding'].shape[0] - 1) ** 0.5)
    width = sd['ln_final.weight'].shape[0]
    return CLIPConfig(
        embed_dim=sd['text_projection'].shape[1], image_resolution=32 * grid,
        vision_layers=tuple(count(f'visual.layer{i}.') for i in (1, 2, 3, 4)),
        vision_width=sd['visual.layer1.0.conv1.weight'].shape[0],
        context_length=sd['positional_embedding'].shape[0], vocab_size=sd['token_embedding.weight'].shape[0],
        transformer_width=width, transformer_heads=width // 64, transformer_layers=count('transformer.resblocks.'))

# ----------------------------------------------------------------------------- loading


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, root: str) -> str:
    """Return root/<file name>, downloading it unless a copy with the SHA-256 that the URL names
    is there. Written to a temporary file and renamed, so no partial or wrong file is ever used."""
    expected = url.split('/')[-2]
    target = os.path.join(root, os.path.basename(url))
    if os.path.isfile(target):
        if _sha256(target) == expected:
            return target
        warnings.warn(f'{target} does not have the expected SHA-256; downloading it again')
    os.makedirs(root, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=os.path.basename(url) + '.', suffix='.part')
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(url, timeout=60) as src:
            size = int(src.headers.get('Content-Length') or 0) or None
            with tqdm(total=size, unit='B', unit_scale=True, desc=os.path.basename(url)) as bar:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except OSError as e:  # URLError, HTTPError, timeouts and a full disk are all OSErrors
        os.remove(tmp)
        raise SystemExit(f'cannot download {url} ({getattr(e, "reason", e)}); without network, fetch it '
                         f'elsewhere and save it as {target}, or pass its path to load()') from None
    if (got := digest.hexdigest()) != expected:
        os.remove(tmp)
        raise SystemExit(f'{url} downloaded with SHA-256 {got}, expected {expected}; the file was deleted, '
                         f'try again')
    os.replace(tmp, target)
    return target


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A TorchScript archive (OpenAI's release format), a torch.save'd state dict, or {'state_dict': ...}."""
    try:
        with zipfile.ZipFile(path) as z:  # TorchScript archives are zips with code and constants.pkl
            scripted = any(name.split('/')[-1] == 'constants.pkl' for name in z.namelist())
    except zipfile.BadZipFile:
        scripted = False
    try:
        with warnings.catch_warnings():  # torch.jit is deprecated, but it is the format OpenAI ships
            warnings.simplefilter('ignore', FutureWarning)
            sd = (torch.jit.load(path, map_location='cpu').state_dict() if scripted
                  else torch.load(path, map_location='cpu', weights_only=True))
    except (RuntimeError, pickle.UnpicklingError, EOFError) as e:
        raise SystemExit(f'cannot read {path} as a TorchScript archive or a state dict: {str(e).splitlines()[0]}') from None
    sd = sd.get('state_dict', sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        raise SystemExit(f'{path} holds a {type(sd).__name__}, not a state dict')
    # OpenAI's archives carry these scalars beside the weights; the shapes already say the same.
    return {k: v for k, v in sd.items() if k not in ('input_resolution', 'context_length', 'vocab_size')}


def load(name_or_path: str, device: str | torch.device = 'cpu', download_root: str | None = None) -> CLIP:
    """Return the CLIP model (float32, eval mode, on `device`); no preprocessing transform, since
    callers normalise with IMAGE_MEAN / IMAGE_STD themselves. A name in MODELS is downloaded into
    download_root, else $CLIP_CACHE, else ~/.cache/clip; anything else must be a file path.
    Every failure (unknown name, offline, checksum, unreadable or non-CLIP file) is a one-line SystemExit."""
    if name_or_path in MODELS:
        root = download_root or os.environ.get('CLIP_CACHE') or os.path.expanduser('~/.cache/clip')
        path = _download(MODELS[name_or_path], root)
    elif os.path.isfile(name_or_path):
        path = name_or_path
    else:
        raise SystemExit(f'no CLIP model {name_or_path!r}: not a file, and not one of {", ".join(MODELS)}')
    sd = _read_state_dict(path)
    cfg = config_from_state_dict(sd, path)
    with torch.device('meta'):  # no memory and no random init: every tensor comes from the checkpoint
        model = CLIP(cfg)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise SystemExit(f'{path} does not match the CLIP architecture its shapes imply: '
                         f'{" ".join(str(e).split())[:300]}') from None
    return model.float().to(device).eval()
