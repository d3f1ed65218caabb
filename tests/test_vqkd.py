"""VQ-KD tokens (BEiT v2, issue 16): the released checkpoint's layout loads by name, the encoder
computes BEiT v2's VQKD.encode and quantizer, downloads are checked, and the token files feed
pre-training. Checkpoints are written here with random weights (no download)."""
import hashlib
import io
import math
import os
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

import data
import pretrain
import tokenizer

BASE = tokenizer.VQKD_URL.format(*next(iter(tokenizer.VQKD.items())))  # the 3x768x12 release
SMALL = dict(D=128, depth=2, G=4, p=8, K=16, C=8)  # 2 heads of 64; 32 px, the micro ViT's grid


def beit_layout(D=768, depth=12, G=14, p=16, K=8192, C=32, decoder_depth=3):
    """Key -> shape of BEiT v2's VQKD state dict as training saves it, less the teacher (which the
    release lacks and BEiT v2's loader drops), from modeling_vqkd.py (vqkd_encoder_base_decoder_
    3x768x12_clip), modeling_finetune.py and norm_ema_quantizer.py. Encoder and decoder are
    modeling_finetune's VisionTransformer with qkv_bias (q_bias, v_bias), init_values 0 (no
    gamma), use_mean_pooling (fc_norm, no norm) and num_classes 0 (no head); the decoder reads the
    C-dim codes as a G x G image of 1 px patches."""
    def vit(prefix, depth, in_chans, patch):
        keys = {'cls_token': (1, 1, D), 'pos_embed': (1, G * G + 1, D),
                'patch_embed.proj.weight': (D, in_chans, patch, patch),
                'patch_embed.proj.bias': (D,), 'fc_norm.weight': (D,), 'fc_norm.bias': (D,)}
        for i in range(depth):
            keys |= {f'blocks.{i}.{k}': s for k, s in {
                'norm1.weight': (D,), 'norm1.bias': (D,), 'attn.q_bias': (D,),
                'attn.v_bias': (D,), 'attn.qkv.weight': (3 * D, D), 'attn.proj.weight': (D, D),
                'attn.proj.bias': (D,), 'norm2.weight': (D,), 'norm2.bias': (D,),
                'mlp.fc1.weight': (4 * D, D), 'mlp.fc1.bias': (4 * D,),
                'mlp.fc2.weight': (D, 4 * D), 'mlp.fc2.bias': (D,)}.items()}
        return {f'{prefix}.{k}': s for k, s in keys.items()}
    return {**vit('encoder', depth, 3, p), **vit('decoder', decoder_depth, C, 1),
            'encode_task_layer.0.weight': (D, D), 'encode_task_layer.0.bias': (D,),
            'encode_task_layer.2.weight': (C, D), 'encode_task_layer.2.bias': (C,),
            'decode_task_layer.0.weight': (D, D), 'decode_task_layer.0.bias': (D,),
            'decode_task_layer.2.weight': (512, D), 'decode_task_layer.2.bias': (512,),
            'quantize.cluster_size': (K,), 'quantize.embedding.weight': (K, C),
            'quantize.embedding.cluster_size': (K,), 'quantize.embedding.embed_avg': (K, C),
            'quantize.embedding.initted': (1,),
            'scaling_layer.shift': (1, 3, 1, 1), 'scaling_layer.scale': (1, 3, 1, 1)}


def random_state_dict(seed=0, **sizes):
    """Random weights that keep every layer's contribution visible: fan-in scaled matrices, norms
    around 1, codes of length 0.8-1.2 (so |w|^2 matters in the quantizer's distance)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in beit_layout(**sizes).items():
        t = torch.randn(s, generator=g)
        if len(s) == 1:  # biases, norms
            t = 0.3 * t + k.endswith(('norm1.weight', 'norm2.weight', 'fc_norm.weight'))
        elif k.endswith('.weight') and 'quantize' not in k:
            t /= math.sqrt(math.prod(s[1:]))
        sd[k] = t
    w = sd['quantize.embedding.weight']
    sd['quantize.embedding.weight'] = F.normalize(w, dim=1) * (0.8 + 0.4 * torch.rand(len(w), 1))
    return sd


def save(sd, path):
    torch.save({'model': sd}, path)  # BEiT v2's checkpoint format (utils.save_model)
    return str(path)


def reference(sd, images, heads):
    """BEiT v2's VQKD.get_codebook_indices from its equations, in float64: pre_process (pixels in
    [0, 1] -> [-1, 1]), the encoder (pre-norm blocks; attention with q and v biases, no k bias,
    softmax(q k^T / sqrt(d)) v; exact GELU MLP; no layer scale; fc_norm on the patch tokens),
    encode_task_layer (Linear, Tanh, Linear), then the quantizer: z L2-normalised, the code of
    least |z|^2 + |w|^2 - 2 z.w. -> (z [B, N, C], codes [B, N])."""
    sd = {k: v.double() for k, v in sd.items()}

    def e(key):
        return sd['encoder.' + key]

    def norm(x, name):
        return F.layer_norm(x, x.shape[-1:], e(name + '.weight'), e(name + '.bias'), eps=1e-6)

    p = e('patch_embed.proj.weight').shape[-1]
    x = images.double() * 255 / 127.5 - 1
    x = F.conv2d(x, e('patch_embed.proj.weight'), e('patch_embed.proj.bias'), stride=p)
    x = torch.cat([e('cls_token').expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], 1)
    x = x + e('pos_embed')
    B, T, D = x.shape
    depth = len({k.split('.')[2] for k in sd if k.startswith('encoder.blocks.')})
    for i in range(depth):
        h = norm(x, f'blocks.{i}.norm1')
        wq, wk, wv = e(f'blocks.{i}.attn.qkv.weight').chunk(3)
        q, k, v = (h @ wq.T + e(f'blocks.{i}.attn.q_bias'), h @ wk.T,
                   h @ wv.T + e(f'blocks.{i}.attn.v_bias'))
        q, k, v = (t.reshape(B, T, heads, D // heads).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // heads), dim=-1) @ v
        a = a.transpose(1, 2).reshape(B, T, D)
        x = x + a @ e(f'blocks.{i}.attn.proj.weight').T + e(f'blocks.{i}.attn.proj.bias')
        h = norm(x, f'blocks.{i}.norm2')
        h = F.gelu(h @ e(f'blocks.{i}.mlp.fc1.weight').T + e(f'blocks.{i}.mlp.fc1.bias'))
        x = x + h @ e(f'blocks.{i}.mlp.fc2.weight').T + e(f'blocks.{i}.mlp.fc2.bias')
    x = norm(x[:, 1:], 'fc_norm')
    t = {k[len('encode_task_layer.'):]: v for k, v in sd.items() if k.startswith('encode_task')}
    z = torch.tanh(x @ t['0.weight'].T + t['0.bias']) @ t['2.weight'].T + t['2.bias']
    z = z / z.norm(dim=-1, keepdim=True)
    w = sd['quantize.embedding.weight']
    d = (z ** 2).sum(-1, keepdim=True) + (w ** 2).sum(-1) - 2 * z @ w.T
    return z, d.argmin(-1)


def resolved(*argv):
    return tokenizer.resolve_args(tokenizer.get_args_parser().parse_args([*argv, '--out', 'x']))


@pytest.fixture(scope='module')
def small(tmp_path_factory):
    """(state dict, checkpoint path) of a 2-block VQ-KD over 4x4 patches of 8 px, 16 codes."""
    sd = random_state_dict(**SMALL)
    return sd, save(sd, tmp_path_factory.mktemp('vqkd') / 'small.pth')


def test_the_released_layout_loads_by_name(tmp_path):
    """ViT-B/16 at 224 px, 8192 x 32 codes, a 3-block decoder: every encoder, task-layer and
    codebook tensor lands where model.py's ViT reads it; the decoder's are left by name."""
    sd = random_state_dict()
    vit, codebook = tokenizer.load_vqkd(save(sd, tmp_path / 'base.pth'), 'cpu')
    os.remove(tmp_path / 'base.pth')  # 438 MB, as the release
    config = {k: vit.config[k] for k in ('img_size', 'patch_size', 'embed_dim', 'depth')}
    assert config == dict(img_size=224, patch_size=16, embed_dim=768, depth=12)
    assert vit.config['num_heads'] == 12 and vit.patch_embed.grid == 14
    assert torch.equal(codebook, sd['quantize.embedding.weight']) and codebook.shape == (8192, 32)
    ours = vit.state_dict()
    for k in ('cls_token', 'pos_embed', 'patch_embed.proj.weight', 'fc_norm.bias',
              'blocks.11.mlp.fc2.weight', 'blocks.5.attn.qkv.weight', 'blocks.0.norm1.weight'):
        assert torch.equal(ours[k], sd['encoder.' + k]), k
    for i in range(12):
        bias = ours[f'blocks.{i}.attn.qkv.bias']
        a = f'encoder.blocks.{i}.attn.'
        assert torch.equal(bias, torch.cat([sd[a + 'q_bias'], torch.zeros(768), sd[a + 'v_bias']]))
        assert torch.equal(ours[f'blocks.{i}.ls1.gamma'], torch.ones(768))
    for k in ('0.weight', '0.bias', '2.weight', '2.bias'):
        assert torch.equal(ours['head.' + k], sd['encode_task_layer.' + k])
    extra = 12 * 3 * 768  # ours alone: two gammas and the k bias (zeros) per block
    assert sum(p.numel() for p in vit.parameters()) - extra == sum(
        math.prod(s) for k, s in beit_layout().items() if k.startswith(('encoder.', 'encode_')))


def test_the_encoder_computes_beit_v2s_tokens(small):
    """Our pipeline (uint8 pixels, the shared normalisation, model.py's ViT, assign) against the
    reference written from BEiT v2's equations, on random weights."""
    sd, path = small
    transform, features_of, size, dim, codebook = tokenizer.feature_pipeline(
        resolved('--features', 'vqkd', '--vqkd', path, '--grid', '4', '--vocab', '16'), 'cpu')
    assert (size, dim) == (32, 8)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    f = features_of(images)  # [B, G, G, C]
    z, codes = reference(sd, images / 255, heads=2)
    assert f.shape == (5, 4, 4, 8)
    torch.testing.assert_close(f.reshape(5, 16, 8).double(), z, atol=2e-5, rtol=0)
    ours = tokenizer.assign(f.reshape(-1, 8), codebook)[0].reshape(5, 16)
    assert torch.equal(ours, codes) and len(codes.unique()) > 4


@pytest.mark.slow
def test_tokenizer_command_writes_pretrainable_tokens(small, make_demo_folder, tmp_path):
    """--features vqkd on an ImageFolder: tokens of the pre-training crop, the checkpoint's codebook
    in codebook.npy, the val split through --codebook, and a pre-training run that reads them."""
    sd, path = small
    root, _ = make_demo_folder(train=24, val=6)
    out, val = str(tmp_path / 'vqkd'), str(tmp_path / 'vqkd_val')
    common = ['--data', root, '--workers', '0', '--device', 'cpu', '--batch-size', '10']
    meta = tokenizer.main([*common, '--split', 'train', '--features', 'vqkd', '--vqkd', path,
                           '--grid', '4', '--vocab', '16', '--out', out])
    tokenizer.main([*common, '--split', 'val', '--codebook', out, '--out', val])
    assert meta['features'] == f'vqkd:{path}' and meta['feature_dim'] == 8
    assert meta['image_size'] == 32 and 'inertia' not in meta and meta['skipped'] == []
    assert np.array_equal(np.load(os.path.join(out, 'codebook.npy')),
                          sd['quantize.embedding.weight'].numpy())
    crop = transforms.Compose([data.pretrain_geometry(32), transforms.PILToTensor()])
    for split, token_dir in (('train', out), ('val', val)):
        ds = data.build_dataset(root, split)
        tokens, m = data.load_tokens(token_dir, root, split, len(ds), 4, vocab_size=16, patch=8)
        images = torch.stack([crop(Image.open(p).convert('RGB')) for p, _ in ds.samples])
        assert np.array_equal(tokens.reshape(len(ds), 16), reference(sd, images / 255, 2)[1])
    assert m['features'] == meta['features'] and m['codebook_from'] == os.path.realpath(out)
    summary = pretrain.main(['--data', root, '--tokens', out, '--out', str(tmp_path / 'run'),
                             '--model', 'micro', '--dtype', 'float32', '--workers', '0',
                             '--batch-size', '8', '--steps', '2', '--epochs', '1'])
    assert math.isfinite(summary['loss'])


class Served(io.BytesIO):
    """What urlopen returns, for these bytes."""
    headers = {}


def test_download_is_checked_and_offline_says_where_to_put_the_file(small, tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    cache = tmp_path / 'hub' / 'checkpoints'
    name = next(iter(tokenizer.VQKD))

    def offline(url, timeout):
        raise urllib.error.URLError('no network')

    monkeypatch.setattr(urllib.request, 'urlopen', offline)
    with pytest.raises(SystemExit) as e:
        tokenizer.main(['--split', 'val', '--features', 'vqkd', '--out', str(tmp_path / 'out')])
    assert str(e.value) == (f'tokenizer.py: --vqkd: cannot download {BASE} (no network); offline, '
                            f'fetch it elsewhere and save it as {cache / BASE.split("/")[-1]}, or '
                            'pass its path')
    # a file that is not the release: refused, deleted, never used
    monkeypatch.setattr(urllib.request, 'urlopen', lambda url, timeout: Served(b'a web page'))
    with pytest.raises(SystemExit, match=f'{BASE} downloaded with SHA-256 '
                       f'{hashlib.sha256(b"a web page").hexdigest()}, expected d5036aa7; the file '
                       'was deleted'):
        tokenizer.load_vqkd(name, 'cpu')
    assert os.listdir(cache) == []
    # the right bytes (a release whose name carries this file's digest) load, then from the cache
    blob = open(small[1], 'rb').read()
    monkeypatch.setitem(tokenizer.VQKD, name, hashlib.sha256(blob).hexdigest()[:8])
    monkeypatch.setattr(urllib.request, 'urlopen', lambda url, timeout: Served(blob))
    vit, codebook = tokenizer.load_vqkd(name, 'cpu')
    monkeypatch.setattr(urllib.request, 'urlopen', offline)
    assert torch.equal(tokenizer.load_vqkd(name, 'cpu')[1], codebook)
    assert os.listdir(cache) == [f'{name}-{tokenizer.VQKD[name]}.pth']


def test_a_file_that_does_not_fit_is_refused_naming_the_key(small, tmp_path):
    sd, _ = small
    bad = dict(sd)
    del bad['encoder.blocks.1.attn.v_bias']
    with pytest.raises(SystemExit, match=r'encoder.blocks.1.attn.v_bias is missing, expected '
                       r'\[128\]'):
        tokenizer.load_vqkd(save(bad, tmp_path / 'a.pth'), 'cpu')
    bad = {**sd, 'encoder.blocks.0.attn.qkv.weight': torch.zeros(384, 64)}
    with pytest.raises(SystemExit, match=r'encoder.blocks.0.attn.qkv.weight is \[384, 64\], '
                       r'expected \[384, 128\]'):
        tokenizer.load_vqkd(save(bad, tmp_path / 'b.pth'), 'cpu')
    bad = {**sd, 'encoder.blocks.0.gamma_1': torch.ones(128)}  # layer scale: not this layout
    with pytest.raises(SystemExit, match='unexpected encoder.blocks.0.gamma_1'):
        tokenizer.load_vqkd(save(bad, tmp_path / 'c.pth'), 'cpu')
    encoder_only = {k: v for k, v in sd.items() if not k.startswith(('decoder.', 'decode_'))}
    torch.save({'state_dict': encoder_only}, tmp_path / 'd.pth')  # BEiT v2's loader's other key
    tokenizer.load_vqkd(str(tmp_path / 'd.pth'), 'cpu')  # the decoder: not needed
    (tmp_path / 'notes.txt').write_text('not a checkpoint\n')
    with pytest.raises(SystemExit, match='cannot read .*notes.txt'):
        tokenizer.load_vqkd(str(tmp_path / 'notes.txt'), 'cpu')


@pytest.mark.parametrize('argv, message', [
    (['--features', 'vqkd', '--patch', '16'], '--patch applies to --features hog or pixels'),
    (['--vqkd', 'vqkd_encoder_base_decoder_3x768x12_clip'], '--vqkd applies to --features vqkd'),
    (['--features', 'vqkd', '--vqkd', 'vqkd_base'], "--vqkd: no VQ-KD tokenizer 'vqkd_base': "
     'not a file, nor one of vqkd_encoder_base_decoder_3x768x12_clip, '),
    (['--features', 'vqkd', '--vqkd', 'SMALL'], 'makes 4x4 tokens of 16: pass --grid 4 --vocab 16'),
])
def test_bad_arguments(argv, message, small, tmp_path):
    argv = [small[1] if a == 'SMALL' else a for a in argv]
    with pytest.raises(SystemExit, match=message) as e:
        tokenizer.main(['--split', 'val', '--device', 'cpu', '--out', str(tmp_path), *argv])
    assert '\n' not in str(e.value)
