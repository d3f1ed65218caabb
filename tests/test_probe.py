"""probe.py: the linear probe end to end from a pretrain.py checkpoint and from none (cached and
not), the frozen backbone, distributed evaluation, tokens-only classification learning a rule
the tokens carry, the demo's token files, the result lines, and the clear refusals."""
import json
import os
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
    pretrain.main(['--objective', 'mapet', '--data', root, '--tokens', tokens, '--out', str(out), '--steps', '2',
                   '--batch-size', '8', '--model', 'micro', *FAST])
    return str(out / 'backbone.pt')


# ---------------------------------------------------------------------------------------------
# Linear probe


def test_command_probes_the_pretrained_backbone_on_demo(backbone, tmp_path):
    """The real command in a fresh process; --data demo defaults to --cached, labelled as such."""
    results = tmp_path / 'results.jsonl'
    cmd = [sys.executable, 'probe.py', '--checkpoint', backbone, '--epochs', '2', '--results', str(results), *FAST]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'newly initialised: fc_norm' in result.stdout and 'reported as linear-cached' in result.stdout
    [line] = [l for l in result.stdout.splitlines() if l.startswith('result: ')]
    [record] = read_results(results)
    assert line.startswith(f'result: method=linear-cached  checkpoint={backbone}  data=demo  model=micro  top1=')
    assert record['method'] == 'linear-cached' and record['images'] == 1000 and record['epochs'] == 2
    assert f'top1={record["top1"]:.2f}' in line and record['seconds'] > 0 and 0 <= record['top1'] <= record['top5']


def test_uncached_probe_of_a_random_backbone_on_demo(tmp_path):
    """--checkpoint none, the paper's protocol (augmented images through the frozen backbone)."""
    summary = probe.main(['--checkpoint', 'none', '--no-cached', '--epochs', '1', '--batch-size', '512',
                          '--results', str(tmp_path / 'r.jsonl'), *FAST])
    [record] = read_results(tmp_path / 'r.jsonl')
    assert (record['method'], record['checkpoint'], record['model']) == ('linear', 'none', 'micro')
    assert record['images'] == summary['count'] == 1000 and record['top1'] == summary['top1']


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


def test_distributed_probe_counts_every_image_once(folder, tmp_path):
    """2 gloo processes, cached features sharded by rank: still each of the 11 images once."""
    root, _ = folder
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'probe.py',
           '--checkpoint', 'none', '--model', 'micro', '--data', root, '--cached', '--epochs', '2',
           '--batch-size', '8',
           '--results', str(tmp_path / 'r.jsonl'), *FAST]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert result.returncode == 0, result.stderr[-3000:]
    [record] = read_results(tmp_path / 'r.jsonl')                     # rank 0 alone writes
    assert record['images'] == 11 and record['method'] == 'linear-cached'


# ---------------------------------------------------------------------------------------------
# Tokens-only classification (Tab. 4)


def write_rule_tokens(folder, out, split, codebook):
    """Token files for the folder in which image i's tokens all encode its class c (token c, or
    c + 10 at random): a classifier that reads the tokens aligned with the labels gets 100%."""
    root, _ = folder
    dataset = data.build_dataset(root, split)
    rng = np.random.default_rng(len(split))
    labels = np.asarray(dataset.targets)
    tokens = labels[:, None, None] + 10 * rng.integers(0, 2, (len(labels), 8, 8))
    data.write_tokens(out, tokens, codebook, dict(dataset=data.dataset_id(root), split=split,
                                                  num_images=len(labels), grid=8, vocab_size=20))


@pytest.mark.parametrize('method, extra', [('tokens-mlp', []), ('tokens-vit', ['--model', 'micro'])])
def test_tokens_only_classifiers_learn_what_the_tokens_encode(folder, tmp_path, method, extra):
    codebook = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    write_rule_tokens(folder, tmp_path / 'train', 'train', codebook)
    write_rule_tokens(folder, tmp_path / 'val', 'val', codebook)
    root, _ = folder
    summary = probe.main(['--method', method, '--data', root, '--tokens', str(tmp_path / 'train'), '--val-tokens',
                          str(tmp_path / 'val'), '--epochs', '15', '--batch-size', '8', '--lr', '1',
                          '--warmup-epochs', '2', '--results', str(tmp_path / 'r.jsonl'), *extra, *FAST])
    [record] = read_results(tmp_path / 'r.jsonl')
    assert record['method'] == method and record['checkpoint'] == str(tmp_path / 'train')
    assert summary['count'] == 11 and summary['top1'] == 100.0


def test_tokens_of_another_codebook_are_refused(folder, tmp_path):
    root, tokens = folder
    codebook = np.zeros((16, 48), np.float32)                       # not the train split's codebook
    write_rule_tokens(folder, tmp_path / 'val', 'val', codebook)
    with pytest.raises(SystemExit, match=r'was not made with the codebook of .*--split val --codebook'):
        probe.main(['--method', 'tokens-mlp', '--data', root, '--tokens', tokens, '--val-tokens',
                    str(tmp_path / 'val'), *FAST])


def test_demo_token_files_are_made_when_missing(tmp_path, monkeypatch):
    """The train split's codebook is fitted first, then the val split is assigned with it."""
    calls = []
    monkeypatch.setattr(probe.tokenizer, 'main', lambda argv: calls.append(argv))
    args = probe.resolve_args(probe.get_args_parser().parse_args(
        ['--method', 'tokens-mlp', '--tokens', str(tmp_path / 'tr'), '--val-tokens', str(tmp_path / 'va')]))
    probe.ensure_demo_tokens(args, training.setup_distributed())
    assert calls == [['--data', 'demo', '--split', 'train', '--features', 'pixels', '--out', str(tmp_path / 'tr'),
                      '--device', 'cpu'],
                     ['--data', 'demo', '--split', 'val', '--codebook', str(tmp_path / 'tr'), '--out',
                      str(tmp_path / 'va'), '--device', 'cpu']]
    defaults = probe.resolve_args(probe.get_args_parser().parse_args(['--method', 'tokens-vit']))
    assert (defaults.tokens, defaults.val_tokens) == ('runs/tokens/demo', 'runs/tokens/demo_val')


# ---------------------------------------------------------------------------------------------
# Refusals


def test_user_mistakes_get_one_line(backbone, folder, tmp_path):
    root, tokens = folder
    cases = [
        ([], '--method linear needs --checkpoint'),
        (['--checkpoint', backbone, '--model', 'tiny'], r'\(micro\); you asked for .*\(tiny\): pass --model micro'),
        (['--checkpoint', str(tmp_path / 'missing.pt')], 'no checkpoint file'),
        (['--method', 'tokens-mlp', '--cached'], '--cached is not used by --method tokens-mlp'),
        (['--method', 'tokens-mlp', '--model', 'tiny'], '--model is not used by --method tokens-mlp'),
        (['--checkpoint', 'none', '--tokens', tokens], '--tokens is not used by --method linear'),
        (['--method', 'tokens-mlp', '--data', root], 'needs --tokens and --val-tokens'),
        (['--method', 'tokens-mlp', '--data', root, '--tokens', tokens, '--val-tokens', str(tmp_path / 'none')],
         r'no token file .*meta\.json: run `python tokenizer\.py .* --split val .*--codebook'),
        (['--checkpoint', 'none', '--eval-crop', '1.5'], '--eval-crop must be at most 1'),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=f'^probe.py: .*{message}'):
            probe.main([*argv, '--results', str(tmp_path / 'r.jsonl'), *FAST])
    assert not os.path.exists(tmp_path / 'r.jsonl')
