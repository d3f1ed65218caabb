"""probe.py: the linear probe end to end from a pretrain.py checkpoint and from none (cached and
not), the frozen backbone, distributed evaluation, tokens-only classification learning a rule
the tokens carry, the demo's token files, the result lines, and the clear refusals whose
suggested commands work when pasted."""
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import model
import pretrain
import probe
import tokenizer
import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ['--dtype', 'float32', '--workers', '0']


def read_results(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def folder(make_demo_folder):
    """An ImageFolder of 32 px demo pictures, 40 train / 11 val images (11: not divisible by two
    processes), and the pixel tokens of its train split (vocabulary 16)."""
    return make_demo_folder(train=40, val=11)


@pytest.fixture(scope='module')
def backbone(folder, tmp_path_factory):
    """backbone.pt of a 2-step MaPeT pre-training through pretrain.py's command-line entry point."""
    root, tokens = folder
    out = tmp_path_factory.mktemp('pretrain')
    pretrain.main(['--objective', 'mapet', '--data', root, '--tokens', tokens, '--out', str(out),
                   '--steps', '2', '--batch-size', '8', '--model', 'micro', *FAST])
    return str(out / 'backbone.pt')


# ---------------------------------------------------------------------------------------------
# Linear probe


@pytest.mark.slow
def test_command_probes_the_pretrained_backbone_on_demo(backbone, tmp_path):
    """The real command in a fresh process; --data demo defaults to --cached, labelled as such."""
    results = tmp_path / 'results.jsonl'
    cmd = [sys.executable, 'probe.py', '--checkpoint', backbone, '--epochs', '2',
           '--results', str(results), *FAST]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'newly initialised: fc_norm' in result.stdout
    assert 'reported as linear-cached' in result.stdout
    assert result.stdout.startswith('git revision ') and '\nbatch_size=256  ' in result.stdout
    [line] = [row for row in result.stdout.splitlines() if row.startswith('result: ')]
    [record] = read_results(results)
    assert line.startswith(f'result: method=linear-cached  checkpoint={backbone}  data=demo  '
                           'model=micro  top1=')
    assert (record['method'], record['images'], record['epochs']) == ('linear-cached', 1000, 2)
    assert record['seed'] == 0 and record['git']
    assert f'top1={record["top1"]:.2f}' in line and record['seconds'] > 0
    assert 0 <= record['top1'] <= record['top5']


@pytest.mark.slow
def test_uncached_probe_of_a_random_backbone_on_demo(tmp_path):
    """--checkpoint none, the paper's protocol (augmented images through the frozen backbone)."""
    summary = probe.main(['--checkpoint', 'none', '--no-cached', '--epochs', '1',
                          '--batch-size', '512', '--results', str(tmp_path / 'r.jsonl'), *FAST])
    [record] = read_results(tmp_path / 'r.jsonl')
    assert (record['method'], record['checkpoint'], record['model']) == ('linear', 'none', 'micro')
    assert record['images'] == summary['count'] == 1000 and record['top1'] == summary['top1']


def test_pixel_baseline_is_logistic_regression_on_the_normalised_pixels():
    """--checkpoint pixels: the head sees exactly the normalised image, at a stable lr."""
    args = probe.resolve_args(probe.get_args_parser().parse_args(['--checkpoint', 'pixels']))
    assert (args.model, args.lr, args.cached) == ('micro', 0.1, True)
    lp = probe.LinearProbe(probe.Pixels(32), 10)
    images = torch.randn(3, 3, 32, 32)
    assert lp.head.in_features == 3 * 32 * 32
    torch.testing.assert_close(lp(images), images.flatten(1) @ lp.head.weight.T + lp.head.bias)


def test_only_the_head_learns():
    """The backbone stays frozen and in eval mode (no drop path) however the probe is switched."""
    vit = model.create_model('micro', num_classes=0)
    lp = probe.LinearProbe(vit, 10).train()
    assert not vit.training and lp.head.training
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(lp(images), lp(images))                # deterministic: no drop path
    F.cross_entropy(lp(images), torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is None and not p.requires_grad for p in vit.parameters())
    assert lp.head.weight.grad.abs().sum() > 0
    assert [n for n, p in lp.named_parameters() if p.requires_grad] == ['head.weight', 'head.bias']


@pytest.mark.slow
@pytest.mark.parametrize('cached', ['--cached', '--no-cached'])
def test_distributed_probe_counts_every_image_once(folder, tmp_path, cached):
    """2 gloo processes, the split sharded by rank: still each of the 11 images once. Uncached,
    DDP trains the head on the frozen backbone as 1 process does: the same accuracy."""
    root, _ = folder
    argv = ['--checkpoint', 'none', '--model', 'micro', '--data', root, cached, '--epochs', '2',
            '--batch-size', '8', '--lr', '50', '--results', str(tmp_path / 'r.jsonl'), *FAST]
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           'probe.py', *argv]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-3000:]
    [record] = read_results(tmp_path / 'r.jsonl')                     # rank 0 alone writes
    method = 'linear-cached' if cached == '--cached' else 'linear'
    assert record['images'] == 11 and record['method'] == method
    if cached == '--no-cached':
        alone = probe.main(argv)
        assert (alone['top1'], alone['top5']) == (record['top1'], record['top5'])


# ---------------------------------------------------------------------------------------------
# Tokens-only classification (Tab. 4)


def write_rule_tokens(folder, out, split, codebook):
    """Token files for the folder in which image i's tokens all encode its class c (token c, or
    c + 10 at random): a classifier that reads the tokens aligned with the labels gets 100%."""
    root, _ = folder
    dataset = data.build_dataset(root, split)
    rng = np.random.default_rng(len(split))
    labels = np.asarray(dataset.targets)
    G = model.MODEL_CONFIGS['micro']['img_size'] // model.MODEL_CONFIGS['micro']['patch_size']
    tokens = labels[:, None, None] + 10 * rng.integers(0, 2, (len(labels), G, G))
    meta = {'dataset': data.dataset_id(root), 'split': split, 'num_images': len(labels), 'grid': G,
            'vocab_size': 20}
    data.write_tokens(out, tokens, codebook, meta)


@pytest.mark.parametrize('method, extra', [
    ('tokens-mlp', []),
    pytest.param('tokens-vit', ['--model', 'micro'], marks=pytest.mark.slow)])
def test_tokens_only_classifiers_learn_what_the_tokens_encode(folder, tmp_path, method, extra):
    codebook = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    write_rule_tokens(folder, tmp_path / 'train', 'train', codebook)
    write_rule_tokens(folder, tmp_path / 'val', 'val', codebook)
    root, _ = folder
    summary = probe.main(['--method', method, '--data', root, '--tokens', str(tmp_path / 'train'),
                          '--val-tokens', str(tmp_path / 'val'), '--epochs', '15', '--lr', '1',
                          '--batch-size', '8', '--warmup-epochs', '2',
                          '--results', str(tmp_path / 'r.jsonl'), *extra, *FAST])
    [record] = read_results(tmp_path / 'r.jsonl')
    assert record['method'] == method and record['checkpoint'] == str(tmp_path / 'train')
    assert summary['count'] == 11 and summary['top1'] == 100.0


def test_tokens_of_another_codebook_are_refused(folder, tmp_path):
    root, tokens = folder
    codebook = np.zeros((16, 48), np.float32)                       # not the train split's codebook
    write_rule_tokens(folder, tmp_path / 'val', 'val', codebook)
    with pytest.raises(SystemExit, match='not made with the codebook of .*--split val --codebook'):
        probe.main(['--method', 'tokens-mlp', '--data', root, '--tokens', tokens, '--val-tokens',
                    str(tmp_path / 'val'), *FAST])


def test_demo_defaults_name_the_demo_token_dirs():
    defaults = probe.resolve_args(probe.get_args_parser().parse_args(['--method', 'tokens-vit']))
    demo = 'runs/tokens/demo_hog'  # the demo's HOG tokens
    assert (defaults.tokens, defaults.val_tokens) == (demo, demo + '_val')


@pytest.mark.slow
def test_demo_token_files_are_made_when_missing(tmp_path):
    """A first tokens-only run on the demo makes the train tokens, then the val tokens with the
    train split's codebook, and classifies with them."""
    train, val = tmp_path / 'tr', tmp_path / 'va'
    summary = probe.main(['--method', 'tokens-mlp', '--tokens', str(train), '--val-tokens',
                          str(val), '--epochs', '1', '--results', str(tmp_path / 'r.jsonl'), *FAST])
    assert [tokenizer.read_meta(t)['split'] for t in (train, val)] == ['train', 'val']
    np.testing.assert_array_equal(np.load(train / 'codebook.npy'), np.load(val / 'codebook.npy'))
    assert summary['count'] == 1000 and read_results(tmp_path / 'r.jsonl')[0]['images'] == 1000


# ---------------------------------------------------------------------------------------------
# Refusals


def test_user_mistakes_get_one_line(folder, tmp_path, monkeypatch):
    root, tokens = folder
    backbone = str(tmp_path / 'backbone.pt')
    training.save_backbone(backbone, model.create_model('micro'), {})
    cases = [
        ([], '--method linear needs --checkpoint'),
        (['--checkpoint', backbone, '--model', 'tiny'],
         r'\(micro\); you asked for .*\(tiny\): pass --model micro'),
        (['--checkpoint', str(tmp_path / 'missing.pt')], 'no checkpoint file'),
        (['--method', 'tokens-mlp', '--cached'], '--cached is not used by --method tokens-mlp'),
        (['--method', 'tokens-mlp', '--model', 'tiny'], '--model is not used by --method tokens-'),
        (['--checkpoint', 'none', '--tokens', tokens], '--tokens is not used by --method linear'),
        (['--method', 'tokens-mlp', '--data', root], 'needs --tokens and --val-tokens'),
        (['--method', 'tokens-mlp', '--data', root, '--tokens', tokens,
          '--val-tokens', str(tmp_path / 'none')],
         r'no token file .*meta\.json: run `python tokenizer\.py .* --split val .*--codebook'),
        (['--checkpoint', 'none', '--eval-crop', '1.5'], r'--eval-crop must be in \[0, 1\]'),
        (['--checkpoint', 'none', '--epochs', '0'], '--epochs must be positive'),
        (['--checkpoint', 'none', '--data', root, '--batch-size', '64'],
         '40 training images, fewer than one --batch-size 64: pass --batch-size 40'),
    ]
    if not torch.cuda.is_available():
        cases.append((['--checkpoint', 'none', '--device', 'cuda'], 'no GPU.*pass --device cpu'))
    for argv, message in cases:
        with pytest.raises(SystemExit, match=f'^probe.py: .*{message}') as error:
            probe.main([*argv, '--results', str(tmp_path / 'r.jsonl'), *FAST])
        assert '\n' not in str(error.value)
    monkeypatch.setenv('WORLD_SIZE', '3')          # as torchrun sets it: checked before joining
    with pytest.raises(SystemExit, match='--batch-size 256 does not divide among 3 processes: pass '
                       '--batch-size 255'):
        probe.main(['--checkpoint', 'none', *FAST])
    assert not os.path.exists(tmp_path / 'r.jsonl')


def commands_in(message):
    """The tokenizer.py argument lists of the `python tokenizer.py ...` commands in a message."""
    commands = [shlex.split(c) for c in re.findall('`([^`]*)`', message)]
    assert commands and all(c[:2] == ['python', 'tokenizer.py'] for c in commands)
    return [c[2:] for c in commands]


def test_missing_token_dirs_name_the_commands_that_make_them(folder):
    root, _ = folder
    with pytest.raises(SystemExit) as error:
        probe.main(['--method', 'tokens-mlp', '--data', root, *FAST])
    train, val = (tokenizer.get_args_parser().parse_args(c) for c in commands_in(str(error.value)))
    assert (train.data, train.split, train.codebook) == (root, 'train', None)
    assert (val.data, val.split, val.codebook) == (root, 'val', train.out) and val.out != train.out
    assert str(error.value).endswith(f'then pass --tokens {train.out} --val-tokens {val.out}')


def test_train_tokens_as_val_tokens_suggest_a_command_that_works(folder, tmp_path):
    """The fix names the val split, the train codebook and a new dir; run as printed, it works."""
    root, tokens = folder
    argv = ['--method', 'tokens-mlp', '--data', root, '--tokens', tokens, '--epochs', '1',
            '--batch-size', '8', '--results', str(tmp_path / 'r.jsonl'), *FAST]
    with pytest.raises(SystemExit, match=r'holds tokens of .* train \(40 images\), not of .* val') \
            as error:
        probe.main([*argv, '--val-tokens', tokens])
    [command] = commands_in(str(error.value))
    val = tokenizer.get_args_parser().parse_args(command)
    assert (val.split, val.codebook, val.out) == ('val', tokens, tokens + '_val')
    assert str(error.value).endswith(f'then pass --val-tokens {val.out}')
    tokenizer.main(command)
    assert probe.main([*argv, '--val-tokens', val.out])['count'] == 11
