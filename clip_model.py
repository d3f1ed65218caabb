"""OpenAI CLIP with ResNet image towers; loads OpenAI's checkpoints unchanged.

k-CLIP (Sec. 4.2) clusters `layer4` of a CLIP ResNet (`encode_dense`, on images normalised with
IMAGE_MEAN / IMAGE_STD at 32*G px); the paper used RN50x64 (C = 4096), this project RN50 (2048).
The architecture is read from the tensor shapes, so checkpoints load with strict=True; ViT CLIP
models are refused.

    model = clip_model.load('RN50')  # or a file; downloads to ~/.cache/clip ($CLIP_CACHE)
    feats = model.encode_dense(x)  # (B, 3, 448, 448) -> (B, 2048, 14, 14)
    logits_per_image, logits_per_text = model(x224, clip_model.tokenize(['a dog', 'a cat']))
"""
import gzip
import hashlib
import html
import math
import os
import tempfile
import urllib.request
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise

import ftfy
import regex
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's training-set RGB statistics
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

# OpenAI's release; each URL names its file's SHA-256, checked by download().
URL = 'https://openaipublic.azureedge.net/clip/models/{}/{}.pt'
MODELS = {name: URL.format(sha256, name) for name, sha256 in (
    ('RN50', 'afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762'),
    ('RN101', '8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599'),
    ('RN50x4', '7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd'),
    ('RN50x16', '52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa'),
    ('RN50x64', 'be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c'))}

# Text tokenizer.

VOCAB_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          'bpe_simple_vocab_16e6.txt.gz')
SOT, EOT = '<|startoftext|>', '<|endoftext|>'
# Pre-tokens: special tokens, contractions, letter runs, single digits, punctuation runs.
PRETOKEN = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+"
                         r"|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)


def byte_alphabet():
    """A printable character per byte: BPE sees no whitespace and has no unknown token."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
                 *range(ord('®'), ord('ÿ') + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)  # unused code points
    return table  # the first 256 vocabulary ids, in order


class BPETokenizer:
    """CLIP's lower-cased byte-level BPE: 49408 ids = 256 bytes x 2 + 48894 merges + 2 special."""

    def __init__(self, path=VOCAB_PATH):
        self.byte_char = byte_alphabet()
        with gzip.open(path) as f:
            lines = f.read().decode('utf-8').split('\n')
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # 0: a header
        chars = list(self.byte_char.values())
        vocab = chars + [c + '</w>' for c in chars] + [''.join(m) for m in merges] + [SOT, EOT]
        self.encoder = {piece: i for i, piece in enumerate(vocab)}
        self.rank = {pair: i for i, pair in enumerate(merges)}  # lower: merged earlier
        self.cache = {SOT: [SOT], EOT: [EOT]}

    def bpe(self, word):
        """A pre-token -> vocabulary pieces: merge the best-ranked known pair until none is left."""
        if word not in self.cache:
            parts = [*word[:-1], word[-1] + '</w>']  # '</w>' marks the end of a word
            while len(parts) > 1:
                best = min(pairwise(parts), key=lambda pair: self.rank.get(pair, math.inf))
                if best not in self.rank:
                    break
                i = 0
                while i < len(parts) - 1:  # every occurrence, left to right, without overlap
                    if (parts[i], parts[i + 1]) == best:
                        parts[i:i + 2] = [parts[i] + parts[i + 1]]
                    i += 1
            self.cache[word] = parts
        return self.cache[word]

    def encode(self, text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))  # mojibake, '&amp;amp;' -> '&'
        text = regex.sub(r'\s+', ' ', text).strip().lower()
        return [self.encoder[piece] for pretoken in PRETOKEN.findall(text)
                for piece in self.bpe(''.join(self.byte_char[b] for b in pretoken.encode('utf-8')))]


@lru_cache(maxsize=1)
def bpe_tokenizer():
    return BPETokenizer()


def tokenize(texts: str | list[str], context_length: int = 77, truncate: bool = False):
    """Texts -> (B, context_length) int64, zero-padded, as clip.tokenize; too long: RuntimeError,
    or with truncate=True cut, ending in <|endoftext|>."""
    texts = [texts] if isinstance(texts, str) else texts
    tok = bpe_tokenizer()
    sot, eot = tok.encoder[SOT], tok.encoder[EOT]
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [sot, *tok.encode(text), eot]
        if len(ids) > context_length:
            if not truncate:
                raise RuntimeError(f'Input {text} is too long for context length {context_length} '
                                   '(truncate=True cuts it)')
            ids = ids[:context_length - 1] + [eot]
        out[i, :len(ids)] = torch.tensor(ids)
    return out

# Image tower.


def conv_bn(cin, cout, k, stride=1):  # (conv, bn) pair, OpenAI's convN / bnN keys
    return nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 conv, 4x wider; strides are anti-aliased average pools."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        out, pool = planes * 4, lambda: nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv1, self.bn1 = conv_bn(inplanes, planes, 1)
        self.conv2, self.bn2 = conv_bn(planes, planes, 3)
        self.avgpool = pool()
        self.conv3, self.bn3 = conv_bn(planes, out, 1)
        self.downsample = None
        if stride > 1 or inplanes != out:  # OpenAI's downsample.0 / .1 keys
            conv, bn = conv_bn(inplanes, out, 1)
            self.downsample = nn.Sequential(OrderedDict([('pool', pool()), ('0', conv), ('1', bn)]))

    def forward(self, x):  # (B, Cin, H, W) -> (B, 4 planes, H/s, W/s)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(self.avgpool(y)))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class AttentionPool2d(nn.Module):
    """Instead of global average pooling, the mean feature (the only query) attends to itself
    and the G x G positions (a learned positional embedding fixes G)."""

    def __init__(self, grid, dim, heads, output_dim):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, dim) / dim ** 0.5)
        self.k_proj, self.q_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.c_proj = nn.Linear(dim, output_dim)

    def forward(self, x):  # (B, C, G, G) -> (B, E)
        B, C, Gh, Gw = x.shape
        if Gh * Gw + 1 != len(self.positional_embedding):
            side = 32 * round((len(self.positional_embedding) - 1) ** 0.5)
            raise ValueError(f'encode_image needs {side}x{side} px, got {32 * Gh}x{32 * Gw}; '
                             'encode_dense takes any size')
        x = x.flatten(2).transpose(1, 2)  # (B, G*G, C)
        x = torch.cat([x.mean(1, keepdim=True), x], 1) + self.positional_embedding
        q, k, v = (t.view(B, t.shape[1], self.heads, -1).transpose(1, 2)  # (B, H, L, C/H)
                   for t in (self.q_proj(x[:, :1]), self.k_proj(x), self.v_proj(x)))
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, C/H)
        return self.c_proj(y.transpose(1, 2).reshape(B, C))


class ModifiedResNet(nn.Module):
    def __init__(self, layers, output_dim, heads, input_resolution, width):
        super().__init__()
        self.conv1, self.bn1 = conv_bn(3, width // 2, 3, stride=2)
        self.conv2, self.bn2 = conv_bn(width // 2, width // 2, 3)
        self.conv3, self.bn3 = conv_bn(width // 2, width, 3)
        self.avgpool = nn.AvgPool2d(2)
        for i, blocks in enumerate(layers):  # layer1..4: strides 4, 8, 16, 32
            inplanes, planes = (width, width) if i == 0 else (width * 2 ** (i + 1), width * 2 ** i)
            setattr(self, f'layer{i + 1}', nn.Sequential(
                Bottleneck(inplanes, planes, min(i, 1) + 1),
                *[Bottleneck(planes * 4, planes) for _ in range(blocks - 1)]))
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def forward_dense(self, x):  # (B, 3, H, W) -> (B, 32 width, H/32, W/32)
        x = F.relu(self.bn1(self.conv1(x)))  # stride 2
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(F.relu(self.bn3(self.conv3(x))))  # stride 4
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):  # (B, 3, R, R) -> (B, E)
        return self.attnpool(self.forward_dense(x))

# Text tower.


class QuickGELU(nn.Module):
    """GELU's sigmoid approximation, which CLIP was trained with."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)  # OpenAI's keys
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, 4 * width), gelu=QuickGELU(), c_proj=nn.Linear(4 * width, width)))
        self.ln_2 = nn.LayerNorm(width)  # registered last: OpenAI's key order

    def forward(self, x):  # (B, L, D) -> (B, L, D), pre-norm residual
        causal = torch.full((x.shape[1],) * 2, -math.inf, device=x.device).triu(1)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=causal)[0]
        return x + self.mlp(self.ln_2(x))

# CLIP.


@dataclass
class CLIPConfig:  # defaults: RN50
    embed_dim: int = 1024  # joint image-text embedding E
    image_resolution: int = 224  # native input size R, which sizes the attention pool
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
        width = cfg.transformer_width
        # Head counts are not in the weights: OpenAI's heads are 64 wide in both towers.
        self.visual = ModifiedResNet(cfg.vision_layers, cfg.embed_dim, cfg.vision_width * 32 // 64,
                                     cfg.image_resolution, cfg.vision_width)
        blocks = [ResidualAttentionBlock(width, cfg.transformer_heads)
                  for _ in range(cfg.transformer_layers)]
        self.transformer = nn.ModuleDict({'resblocks': nn.Sequential(*blocks)})  # OpenAI's keys
        self.token_embedding = nn.Embedding(cfg.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.context_length, width) * 0.01)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, cfg.embed_dim) * width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # inverse temperature

    def encode_dense(self, images):  # (B, 3, H, W) -> (B, C, H/32, W/32)
        """layer4, before the attention pool (k-CLIP, Sec. 4.2)."""
        return self.visual.forward_dense(images)

    def encode_image(self, images):  # (B, 3, R, R) -> (B, E)
        return self.visual(images)

    def encode_text(self, tokens):  # (B, L) int64 -> (B, E)
        x = self.token_embedding(tokens) + self.positional_embedding[:tokens.shape[1]]
        x = self.ln_final(self.transformer.resblocks(x))  # (B, L, D)
        # <|endoftext|> has the largest id, so argmax finds it; causally, it has read the text.
        return x[torch.arange(len(x)), tokens.argmax(-1)] @ self.text_projection

    def forward(self, images, tokens):
        """Scaled cosine similarities: logits_per_image (B_img, B_txt) and its transpose."""
        img = F.normalize(self.encode_image(images), dim=-1)
        txt = F.normalize(self.encode_text(tokens), dim=-1)
        logits_per_image = self.logit_scale.exp() * img @ txt.t()
        return logits_per_image, logits_per_image.t()


def config_from_state_dict(sd, source) -> CLIPConfig:
    """As OpenAI's build_model: from tensor shapes and key counts."""
    if 'visual.proj' in sd or 'visual.class_embedding' in sd:
        raise SystemExit(f'{source} is a ViT CLIP model; only ResNet CLIP models work: '
                         f'{", ".join(MODELS)}')

    def count(prefix):
        return len({k[len(prefix):].split('.')[0] for k in sd if k.startswith(prefix)})

    try:
        width = len(sd['ln_final.weight'])
        return CLIPConfig(
            embed_dim=sd['text_projection'].shape[1],
            image_resolution=32 * round(
                (len(sd['visual.attnpool.positional_embedding']) - 1) ** 0.5),
            vision_layers=tuple(count(f'visual.layer{i}.') for i in (1, 2, 3, 4)),
            vision_width=len(sd['visual.layer1.0.conv1.weight']),
            context_length=len(sd['positional_embedding']),
            vocab_size=len(sd['token_embedding.weight']),
            transformer_width=width, transformer_heads=width // 64,
            transformer_layers=count('transformer.resblocks.'))
    except KeyError as e:
        raise SystemExit(f'{source} is not an OpenAI CLIP state dict (no {e})') from None

# Loading.


def sha256(path):
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()


def download(url, root, digest=None):
    """root/<name>, unless there with the URL's SHA-256 (or its first digits, `digest`): fetched
    to a temporary file, checked."""
    expected, name = url.split('/')[-2:]
    expected = digest or expected
    target = os.path.join(root, name)
    if os.path.isfile(target):
        if sha256(target).startswith(expected):
            return target
        warnings.warn(f'{target} lacks the expected SHA-256; downloading it again')
    os.makedirs(root, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=name + '.', suffix='.part')
    try:
        with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(url, timeout=60) as src:
            size = int(src.headers.get('Content-Length') or 0) or None
            with tqdm(total=size, unit='B', unit_scale=True, desc=name) as bar:
                while chunk := src.read(1 << 20):
                    bar.update(out.write(chunk))
    except OSError as e:  # URLError, HTTPError, a timeout, a full disk
        os.remove(tmp)
        raise SystemExit(f'cannot download {url} ({getattr(e, "reason", e)}); offline, fetch it '
                         f'elsewhere and save it as {target}, or pass its path') from None
    if not (got := sha256(tmp)).startswith(expected):
        os.remove(tmp)
        raise SystemExit(f'{url} downloaded with SHA-256 {got}, expected {expected}; the file was '
                         f'deleted, try again')
    os.replace(tmp, target)
    return target


def read_state_dict(path):
    """The tensors of a TorchScript archive (OpenAI's format), a state dict or {'state_dict': }."""
    try:
        with zipfile.ZipFile(path) as z:
            scripted = any(name.endswith('/constants.pkl') for name in z.namelist())
    except zipfile.BadZipFile:
        scripted = False
    try:
        with warnings.catch_warnings():  # torch.jit is deprecated, but OpenAI ships it
            warnings.simplefilter('ignore', FutureWarning)
            sd = (torch.jit.load(path, map_location='cpu').state_dict() if scripted
                  else torch.load(path, map_location='cpu', weights_only=True))
    except Exception as e:  # noqa: BLE001 (the unpickler raises any type)
        raise SystemExit(f'cannot read {path} ({type(e).__name__}): pass one of {", ".join(MODELS)}'
                         ' or an OpenAI TorchScript archive or state dict') from None
    sd = sd.get('state_dict', sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        raise SystemExit(f'{path} holds a {type(sd).__name__}, not a state dict')
    scalars = ('input_resolution', 'context_length', 'vocab_size')  # OpenAI's, beside the weights
    return {k: v for k, v in sd.items() if k not in scalars}


def load(name_or_path: str, device='cpu', download_root: str | None = None) -> CLIP:
    """CLIP in eval mode from a file or a name in MODELS (downloaded into download_root,
    $CLIP_CACHE or ~/.cache/clip); every failure is a one-line SystemExit."""
    if name_or_path in MODELS:
        root = download_root or os.environ.get('CLIP_CACHE') or os.path.expanduser('~/.cache/clip')
        path = download(MODELS[name_or_path], root)
    elif os.path.isfile(name_or_path):
        path = name_or_path
    else:
        raise SystemExit(f'no CLIP model {name_or_path!r}: not a file, and not one of '
                         f'{", ".join(MODELS)}')
    sd = read_state_dict(path)
    with torch.device('meta'):  # no memory, no init: every tensor comes from the file
        model = CLIP(config_from_state_dict(sd, path))
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise SystemExit(f'{path} does not fit the CLIP its shapes imply: '
                         f'{" ".join(str(e).split())[:300]}') from None
    return model.float().to(device).eval()
