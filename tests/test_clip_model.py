"""clip_model.py against OpenAI's reference code (`clip-anytorch`, imported as `clip`, test-only).

Reference models are randomly initialised, then every BatchNorm statistic, bias and the logit
scale are randomised too, so a swapped or ignored tensor changes the outputs. Nothing touches
the network: downloads come from file:// URLs or a patched urlopen.
Run: python -m pytest -q tests/test_clip_model.py
"""
import hashlib
import os
import sys
import urllib.error
import urllib.request
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clip_model  # noqa: E402

with warnings.catch_warnings():  # clip-anytorch imports pkg_resources
    warnings.simplefilter('ignore')
    import clip  # noqa: E402
    from clip.model import CLIP as RefCLIP  # noqa: E402

# (embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
#  context_length, vocab_size, transformer_width, transformer_heads, transformer_layers)
RN50 = (1024, 224, (3, 4, 6, 3), 64, None, 77, 49408, 512, 8, 12)
TINY = (64, 64, (1, 1, 1, 1), 16, None, 77, 49408, 64, 1, 2)
ODD = (48, 96, (1, 2, 1, 1), 8, None, 40, 49408, 128, 2, 2)  # all but the vocabulary unlike RN50
MICRO = (16, 32, (1, 1, 1, 1), 8, None, 8, 64, 64, 1, 1)  # no text to tokenize: a tiny vocabulary
TEXTS = ['a photo of a dog', 'I ❤️ 🐶 and 🍕!!']


def reference(config: tuple, seed: int = 0) -> RefCLIP:
    torch.manual_seed(seed)
    model = RefCLIP(*config).eval()
    with torch.no_grad():  # OpenAI's init zeroes bn3 and all attention biases: make them matter
        for name, p in model.named_parameters():
            if name.endswith('bias'):
                p.normal_(0, 0.05)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        model.logit_scale.fill_(3.0)
    return model


def reference_dense(visual, x: torch.Tensor) -> torch.Tensor:
    """OpenAI's ModifiedResNet.forward up to layer4, i.e. without the attention pool."""
    x = visual.relu1(visual.bn1(visual.conv1(x)))
    x = visual.relu2(visual.bn2(visual.conv2(x)))
    x = visual.avgpool(visual.relu3(visual.bn3(visual.conv3(x))))
    return visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))


def close(ours: torch.Tensor, ref: torch.Tensor):
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def check_parity(ref: RefCLIP, ours: clip_model.CLIP, res: int, dense_hw: tuple[int, int],
                 context_length: int = 77, logits: bool = True):
    torch.manual_seed(1)
    images = torch.randn(2, 3, res, res)
    tokens = clip.tokenize(TEXTS, context_length=context_length)
    with torch.no_grad():
        close(ours.encode_image(images), ref.encode_image(images))
        close(ours.encode_text(tokens), ref.encode_text(tokens))
        for o, r in zip(ours(images, tokens), ref(images, tokens)) if logits else ():
            close(o, r)
        x = torch.randn(2, 3, *dense_hw)
        dense = ours.encode_dense(x)
        channels = ref.visual.layer4[-1].conv3.out_channels
        assert dense.shape == (2, channels, dense_hw[0] // 32, dense_hw[1] // 32)
        close(dense, reference_dense(ref.visual, x))


@pytest.fixture(scope='module')
def rn50(tmp_path_factory):
    ref = reference(RN50)
    path = tmp_path_factory.mktemp('rn50') / 'rn50_state_dict.pt'
    torch.save(ref.state_dict(), path)
    ours = clip_model.load(str(path))
    os.remove(path)  # 400 MB
    return ref, ours


@pytest.mark.slow
def test_rn50_keys_shapes_and_config(rn50):
    ref, ours = rn50
    theirs, mine = ref.state_dict(), ours.state_dict()
    assert list(mine) == list(theirs)
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    assert ours.config == clip_model.CLIPConfig()  # the defaults are RN50
    assert all(v.dtype != torch.float16 for v in mine.values()) and not ours.training


@pytest.mark.slow
def test_rn50_matches_reference(rn50):
    # dense features on a non-square, non-native size; forward() is checked on the smaller models
    check_parity(*rn50, res=224, dense_hw=(64, 96), logits=False)


def test_encode_image_off_native_size_is_a_clear_error():
    ours = clip_model.CLIP(clip_model.CLIPConfig(*MICRO[:4], *MICRO[5:])).eval()
    with pytest.raises(ValueError, match='needs 32x32 px'), torch.no_grad():
        ours.encode_image(torch.randn(1, 3, 64, 64))


@pytest.mark.slow
def test_torchscript_archive_as_openai_ships_it(tmp_path):
    ref = reference(TINY, seed=2)
    for key, value in (('input_resolution', 64), ('context_length', 77), ('vocab_size', 49408)):
        if hasattr(ref, key):
            delattr(ref, key)  # a plain int there; OpenAI's archives hold these as tensors
        ref.register_buffer(key, torch.tensor(value))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        example = (torch.randn(1, 3, 64, 64), clip.tokenize(['hi']))
        traced = torch.jit.trace(ref, example, check_trace=False)
        torch.jit.save(traced, tmp_path / 'tiny.pt')
        assert 'input_resolution' in torch.jit.load(tmp_path / 'tiny.pt').state_dict()
    ours = clip_model.load(str(tmp_path / 'tiny.pt'))
    assert 'input_resolution' not in ours.state_dict()
    check_parity(ref, ours, res=64, dense_hw=(96, 64))


def test_architecture_read_from_shapes(tmp_path):
    """The fast parity check: a small model of odd sizes, every output against OpenAI's code."""
    ref = reference(ODD, seed=3)
    wrapped = {'state_dict': ref.state_dict(), 'epoch': 7}  # a wrapped state dict
    torch.save(wrapped, tmp_path / 'odd.pt')
    ours = clip_model.load(str(tmp_path / 'odd.pt'))
    assert list(ours.state_dict()) == list(ref.state_dict())  # OpenAI's keys, in OpenAI's order
    assert ours.config == clip_model.CLIPConfig(48, 96, (1, 2, 1, 1), 8, 40, 49408, 128, 2, 2)
    check_parity(ref, ours, res=96, dense_hw=(64, 96), context_length=40)


def test_bad_inputs_give_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match='not one of RN50, RN101, RN50x4, RN50x16, RN50x64'):
        clip_model.load('RN51')
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(SystemExit, match='cannot read .*junk.pt'):
        clip_model.load(str(tmp_path / 'junk.pt'))
    (tmp_path / 'notes.txt').write_text('a text file\n')  # the unpickler raised a KeyError here
    with pytest.raises(SystemExit, match=r'cannot read .*notes.txt .*TorchScript archive or state'):
        clip_model.load(str(tmp_path / 'notes.txt'))
    torch.save({'weight': torch.zeros(3)}, tmp_path / 'other.pt')
    with pytest.raises(SystemExit, match='not an OpenAI CLIP state dict'):
        clip_model.load(str(tmp_path / 'other.pt'))
    torch.manual_seed(0)
    vit = RefCLIP(32, 32, 1, 64, 16, 8, 100, 64, 1, 1)  # a ViT CLIP: k-CLIP needs a conv last stage
    torch.save(vit.state_dict(), tmp_path / 'vit.pt')
    with pytest.raises(SystemExit, match='only ResNet CLIP models'):
        clip_model.load(str(tmp_path / 'vit.pt'))


def test_tokenize_matches_reference():
    texts = ['a photo of a dog', 'Café naïve résumé Zürich', 'I ❤️ 🐶 and 🍕!!',
             '3.14159 is π, 1,000,000 items', "don't stop-believing; it's O.K.?",
             'Tom &amp; Jerry &lt;3 &amp;amp;', '<b>tags</b> &amp;amp; entities',
             'triple &amp;amp;amp; escaped', '   lots \t of\n\n  whitespace  ', '',
             'mojibake: â€œquotedâ€\x9d', '中文 日本語 한국어', '<|endoftext|> inside',
             'UPPER lower MiXeD', 'antidisestablishmentarianism ' * 40]
    ours, theirs = clip_model.tokenize(texts, truncate=True), clip.tokenize(texts, truncate=True)
    assert ours.dtype == torch.long and ours.shape == (len(texts), 77)
    assert torch.equal(ours, theirs)
    short = clip_model.tokenize('a dog', context_length=16)
    assert torch.equal(short, clip.tokenize('a dog', context_length=16))
    with pytest.raises(RuntimeError, match='too long for context length 77'):
        clip.tokenize(texts[-1])
    with pytest.raises(RuntimeError, match='too long for context length 77'):
        clip_model.tokenize(texts[-1])


# Downloads.


@pytest.fixture
def release(tmp_path, monkeypatch):
    """A tiny checkpoint 'published' at file:// URLs laid out like OpenAI's: .../<sha256>/<name>.pt,
    once under its true hash ('tiny'), once under a wrong one ('bad'); plus an empty cache dir."""
    ref = reference(MICRO, seed=4)
    torch.save(ref.state_dict(), tmp_path / 'tiny.pt')
    data = (tmp_path / 'tiny.pt').read_bytes()
    urls = {}
    for name, digest in (('tiny', hashlib.sha256(data).hexdigest()), ('bad', '0' * 64)):
        (tmp_path / 'release' / digest).mkdir(parents=True)
        (tmp_path / 'release' / digest / f'{name}.pt').write_bytes(data)
        urls[name] = (tmp_path / 'release' / digest / f'{name}.pt').as_uri()
    monkeypatch.setattr(clip_model, 'MODELS', urls)
    return ref, tmp_path / 'cache', data


def assert_same_weights(ours: clip_model.CLIP, ref: RefCLIP):
    mine, theirs = ours.state_dict(), ref.state_dict()
    assert list(mine) == list(theirs) and all(torch.equal(v, theirs[k]) for k, v in mine.items())


def test_download_verifies_and_caches(release, monkeypatch):
    ref, cache, data = release
    ours = clip_model.load('tiny', download_root=str(cache))
    assert os.listdir(cache) == ['tiny.pt']  # no temporary left
    assert (cache / 'tiny.pt').read_bytes() == data
    assert_same_weights(ours, ref)  # what the model computes with them: the parity tests
    (cache / 'tiny.pt').write_bytes(b'corrupted')  # a bad cached copy is replaced, never used
    with pytest.warns(UserWarning, match='expected SHA-256'):
        assert_same_weights(clip_model.load('tiny', download_root=str(cache)), ref)
    assert (cache / 'tiny.pt').read_bytes() == data

    def offline(*args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(urllib.request, 'urlopen', offline)
    ours = clip_model.load('tiny', download_root=str(cache))  # a good cached copy: no network
    assert_same_weights(ours, ref)


def test_checksum_mismatch_is_refused_and_deleted(release):
    _, cache, _ = release
    with pytest.raises(SystemExit, match=r'SHA-256 [0-9a-f]{64}, expected 0{64}; the file was del'):
        clip_model.load('bad', download_root=str(cache))
    assert os.listdir(cache) == []


def test_offline_message_names_url_and_path(release, monkeypatch):
    _, cache, _ = release
    monkeypatch.setenv('CLIP_CACHE', str(cache))

    def offline(*args, **kwargs):
        raise urllib.error.URLError('no network')
    monkeypatch.setattr(urllib.request, 'urlopen', offline)
    with pytest.raises(SystemExit) as error:
        clip_model.load('tiny')
    message = str(error.value)
    assert clip_model.MODELS['tiny'] in message and str(cache / 'tiny.pt') in message
    assert '\n' not in message
    assert os.listdir(cache) == []


def test_model_table_and_normalisation_equal_openai():
    resnets = {name: url for name, url in clip.clip._MODELS.items() if name.startswith('RN')}
    assert clip_model.MODELS == resnets
    normalize = clip.clip._transform(224).transforms[-1]
    assert clip_model.IMAGE_MEAN == tuple(normalize.mean)
    assert clip_model.IMAGE_STD == tuple(normalize.std)
