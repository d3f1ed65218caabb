"""pretrain.py and training.py: every objective end to end through the command line, exact resume,
two processes and accumulation against one process, atomic checkpoints, the backbone file, the
clear errors, and the schedule / parameter groups against their definitions."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

import data
import model
import pretrain
import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ['--model', 'micro', '--dtype', 'float32', '--workers', '0', '--log-every', '1']
MICRO = model.MODEL_CONFIGS['micro']
GRID = MICRO['img_size'] // MICRO['patch_size']  # the micro ViT's token grid
DEMO_VOCAB = 64  # tokenizer.py's demo codebook size


def read_log(out):
    with open(os.path.join(out, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def state_of(out):
    return training.load_checkpoint(os.path.join(out, 'ckpt.pt'))


# The demo run's settings, shared by the first run and its rerun so they cannot drift apart.
DEMO_RUN = ['--objective', 'mapet', '--steps', '2', '--batch-size', '16', '--dtype', 'float32',
            '--log-every', '1']


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    """The real command in a fresh process, as a user runs it: the demo's tokens are made first."""
    tmp = tmp_path_factory.mktemp('demo')
    tokens, out = str(tmp / 'tokens'), str(tmp / 'run')
    cmd = [sys.executable, 'pretrain.py', *DEMO_RUN, '--tokens', tokens, '--out', out]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return result, tokens, out


@pytest.fixture(scope='module')
def folder(make_demo_folder):
    """A 24-image ImageFolder of 32 px demo pictures and its pixel tokens (GRID, vocabulary 16):
    3 steps per epoch at batch 8, so runs cross epoch boundaries in a few steps."""
    return make_demo_folder(train=24)


def run_folder(folder, out, *extra):
    root, tokens = folder
    return pretrain.main(
        [
            '--data',
            root,
            '--tokens',
            tokens,
            '--out',
            str(out),
            '--batch-size',
            '8',
            '--epochs',
            '2',
            '--warmup-epochs',
            '1',
            '--lr',
            '0.5',
            *FAST,
            *extra,
        ]
    )


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_main_command_builds_tokens_and_writes_checkpoints(demo_run):
    result, tokens, out = demo_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'making them first' in result.stdout and 'done: ' in result.stdout
    assert 'lr 0.032 x 16/2048 = 0.00025' in result.stdout  # the linear scaling rule, printed
    meta = json.load(open(os.path.join(tokens, 'meta.json')))
    assert (meta['dataset'], meta['grid'], meta['vocab_size'], meta['features']) == (
        'demo',
        GRID,
        DEMO_VOCAB,
        'hog',
    )
    log = read_log(out)
    assert [r['step'] for r in log] == [1, 2]
    assert all(math.isfinite(r['loss']) and 0 <= r['token_acc'] <= 1 for r in log)
    # Untrained, the classifier is near uniform over the tokens: loss ~ ln DEMO_VOCAB.
    assert abs(log[0]['loss'] - math.log(DEMO_VOCAB)) < 0.5
    ckpt = torch.load(
        os.path.join(out, 'ckpt.pt'), weights_only=True
    )  # plain values and tensors only
    assert ckpt['step'] == 2 and ckpt['args']['objective'] == 'mapet'
    json.load(open(os.path.join(out, 'args.json')))


@pytest.mark.slow
def test_a_rerun_reproduces_the_first_run(demo_run, tmp_path):
    """The first run made the tokens, the rerun finds them: making them must not shift the seeds."""
    _, tokens, out = demo_run
    pretrain.main([*DEMO_RUN, '--tokens', tokens, '--out', str(tmp_path)])
    np.testing.assert_allclose(
        [r['loss'] for r in read_log(tmp_path)], [r['loss'] for r in read_log(out)], rtol=1e-6
    )


@pytest.mark.slow
@pytest.mark.parametrize('objective', model.OBJECTIVES)
def test_each_objective_trains_and_saves_a_loadable_backbone(demo_run, objective, tmp_path):
    _, tokens, _ = demo_run
    summary = pretrain.main(
        [
            '--objective',
            objective,
            '--tokens',
            tokens,
            '--out',
            str(tmp_path),
            '--steps',
            '3',
            '--batch-size',
            '8',
            '--save-every',
            '2',
            *FAST,
        ]
    )
    log = read_log(tmp_path)
    assert [r['step'] for r in log] == [1, 2, 3] and summary['step'] == 3
    assert all(math.isfinite(r['loss']) and r['grad_norm'] > 0 for r in log)
    ckpt = state_of(tmp_path)
    assert ckpt['step'] == 3 and ckpt['args']['objective'] == objective
    # the vocabulary from the token file
    assert ckpt['model']['decoder.weight'].shape == (DEMO_VOCAB, MICRO['embed_dim'])
    # The backbone file holds exactly the trained backbone, and the FILE loads into timm strictly.
    backbone = torch.load(tmp_path / 'backbone.pt', weights_only=True)
    trained = {
        k[len('backbone.') :]: v for k, v in ckpt['model'].items() if k.startswith('backbone.')
    }
    assert set(backbone['state_dict']) == set(trained)
    assert all(torch.equal(v, trained[k]) for k, v in backbone['state_dict'].items())
    assert backbone['objective'] == objective
    c = backbone['config']
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=c['img_size'],
        patch_size=c['patch_size'],
        embed_dim=c['embed_dim'],
        depth=c['depth'],
        num_heads=c['num_heads'],
        num_classes=0,
        global_pool='avg',
        init_values=c['layer_scale'],
    )
    reference.load_state_dict(backbone['state_dict'], strict=True)
    vit, report = training.load_backbone(str(tmp_path / 'backbone.pt'), num_classes=10)
    assert 'fc_norm, head' in report
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 10)


# ---------------------------------------------------------------------------------------------
# Exactness: resume, processes, accumulation


def image_path(folder, path, tmp_path):
    """No flags for the PIL path; for the decoded-image cache, one written now (device jitter)."""
    if path == 'pil':
        return []
    data.write_image_cache(folder[0], 'train', MICRO['img_size'], str(tmp_path / 'cache'))
    return ['--image-cache', str(tmp_path / 'cache')]


@pytest.mark.slow
@pytest.mark.parametrize('path', ['pil', 'cache'])
def test_resume_is_exact_across_epoch_boundaries(folder, tmp_path, path):
    """4 steps straight == 2 steps + --resume + 2 steps, 3 steps to an epoch: the resume lands
    mid-epoch and then crosses into the next one; drop path and colour jitter are on. Same losses,
    same weights, same optimizer state, bit for bit."""
    images = image_path(folder, path, tmp_path)
    run_folder(folder, tmp_path / 'straight', '--steps', '4', *images)
    run_folder(folder, tmp_path / 'split', '--steps', '2', *images)
    run_folder(folder, tmp_path / 'split', '--steps', '4', '--resume', *images)
    straight, split = read_log(tmp_path / 'straight'), read_log(tmp_path / 'split')
    assert [r['step'] for r in straight] == [r['step'] for r in split] == [1, 2, 3, 4]
    assert [r['loss'] for r in straight] == [r['loss'] for r in split]
    a, b = state_of(tmp_path / 'straight'), state_of(tmp_path / 'split')
    assert a['step'] == b['step'] == 4
    for key in a['model']:
        assert torch.equal(a['model'][key], b['model'][key]), key
    for i, state in a['optimizer']['state'].items():
        for key in ('exp_avg', 'exp_avg_sq', 'step'):
            assert torch.equal(state[key], b['optimizer']['state'][i][key]), (i, key)


def assert_same_run(reference, other, what):
    ref_log, log = read_log(reference), read_log(other)
    assert [r['step'] for r in ref_log] == [r['step'] for r in log], what
    np.testing.assert_allclose(
        [r['loss'] for r in log], [r['loss'] for r in ref_log], rtol=1e-5, err_msg=what
    )
    np.testing.assert_allclose(
        [r['token_acc'] for r in log], [r['token_acc'] for r in ref_log], atol=1e-6
    )
    a, b = state_of(reference)['model'], state_of(other)['model']
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=f'{what}: {key}')


@pytest.mark.slow
@pytest.mark.parametrize('path', ['pil', 'cache'])
def test_two_processes_and_accumulation_match_one_process(folder, tmp_path, path):
    """Global batch 8 as 1 x 8, as 2 processes (torchrun, gloo) x 4, and as 1 x 2 accum x 4, with
    the default drop path 0.1: the same samples, corruptions, drop-path draws and gradients, so
    the same losses and weights up to float order."""
    common = ['--steps', '4', *image_path(folder, path, tmp_path)]
    run_folder(folder, tmp_path / 'one', *common)
    run_folder(folder, tmp_path / 'accum', '--accum', '2', *common)
    root, tokens = folder
    cmd = [
        sys.executable,
        '-m',
        'torch.distributed.run',
        '--standalone',
        '--nproc_per_node=2',
        'pretrain.py',
        '--data',
        root,
        '--tokens',
        tokens,
        '--out',
        str(tmp_path / 'two'),
        '--batch-size',
        '8',
        '--epochs',
        '2',
        '--warmup-epochs',
        '1',
        '--lr',
        '0.5',
        *FAST,
        *common,
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'batch 8 = 2 process(es) x 1 accum x 4' in result.stdout
    assert_same_run(tmp_path / 'one', tmp_path / 'accum', '--accum 2')
    assert_same_run(tmp_path / 'one', tmp_path / 'two', 'torchrun 2 processes')


@pytest.mark.slow
def test_sample_randomness_depends_only_on_seed_epoch_index(folder):
    """The colour jitter and the drop-path draws of a sample are functions of (seed, epoch,
    index), leaving the process's own random stream untouched: what makes resume and any
    process layout exact."""
    root, tokens = folder
    jitter = pretrain.transforms.Compose(
        [pretrain.transforms.ColorJitter(0.4, 0.4, 0.4), pretrain.transforms.ToTensor()]
    )
    dataset = data.build_dataset(root, 'train', transform=jitter)
    rows, _ = data.load_tokens(tokens, root, 'train', len(dataset), GRID)
    pre = model.Pretrainer(model.create_model('micro', depth=3), 'mapet', vocab_size=16)
    args = pretrain.get_args_parser().parse_args(['--image-cache', 'x'])
    items = data.KeyedSet(data.TokenizedDataset(dataset, rows), 0, pretrain.sample_draws(pre, args))
    before = torch.get_rng_state()
    _, _, image, toks, perm, drop, jitter = items[(1, 5)]
    assert torch.equal(torch.get_rng_state(), before)
    assert perm.shape == (16,) and drop.shape == (3,) and jitter.shape == (7,)
    again = items[(1, 5)]
    assert all(torch.equal(a, b) for a, b in zip(again[2:], (image, toks, perm, drop, jitter)))
    other = items[(2, 5)]  # a new epoch, new draws of every kind
    assert not any(torch.equal(a, b) for a, b in zip(other[2:], (image, perm, drop, jitter)))
    assert torch.equal(toks, torch.from_numpy(rows[5].astype(np.int64).reshape(-1)))
    # Each draw is its key's: what the loop used to draw itself with data.per_sample.
    epoch, index = torch.tensor([1]), torch.tensor([5])
    for key, draw, drawn in ((1, pre.draw_perm, perm), (2, pre.draw_drop, drop)):
        assert torch.equal(data.per_sample(draw, epoch, index, 0, key)[0], drawn)


# ---------------------------------------------------------------------------------------------
# Faults


@pytest.mark.slow
def test_interrupted_checkpoint_write_keeps_the_previous_one(folder, tmp_path, monkeypatch):
    calls = []
    real_replace = os.replace

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError('killed between writing the temporary file and the rename')
        real_replace(src, dst)

    monkeypatch.setattr(training.os, 'replace', crash_on_second)
    with pytest.raises(OSError, match='killed'):
        run_folder(folder, tmp_path, '--steps', '3', '--save-every', '1')
    monkeypatch.setattr(training.os, 'replace', real_replace)
    assert os.path.exists(tmp_path / 'ckpt.pt.tmp')
    assert state_of(tmp_path)['step'] == 1  # the last good checkpoint
    assert run_folder(folder, tmp_path, '--steps', '3', '--resume')['step'] == 3


@pytest.mark.slow
def test_damaged_checkpoint_is_refused_clearly(folder, tmp_path):
    run_folder(folder, tmp_path, '--steps', '1')
    path = tmp_path / 'ckpt.pt'
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match='not a readable checkpoint') as e:
        training.load_checkpoint(str(path))
    assert 'weights_only' not in str(e.value)  # torch's unsafe advice
    with pytest.raises(SystemExit, match='not a readable checkpoint'):
        run_folder(folder, tmp_path, '--resume')


@pytest.mark.slow
def test_non_finite_loss_stops_naming_the_step(folder, tmp_path, monkeypatch):
    forward, calls = model.Pretrainer.forward, []

    def nan_at_third_call(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        calls.append(1)
        return logits, loss * math.nan if len(calls) == 3 else loss

    monkeypatch.setattr(model.Pretrainer, 'forward', nan_at_third_call)
    with pytest.raises(SystemExit, match='non-finite loss.*at step 3.*last good checkpoint'):
        run_folder(folder, tmp_path, '--save-every', '1')
    ckpt = state_of(tmp_path)
    assert ckpt['step'] == 2 and all(torch.isfinite(v).all() for v in ckpt['model'].values())
    calls.clear()
    with pytest.raises(SystemExit, match='at step 3') as e:  # no checkpoint yet: none named
        run_folder(folder, tmp_path / 'new')
    assert 'checkpoint' not in str(e.value)


@pytest.mark.slow
def test_wrong_token_files_are_refused(folder, demo_run, tmp_path):
    root, folder_tokens = folder
    _, demo_tokens, _ = demo_run
    with pytest.raises(SystemExit, match=r"made for dataset .*tokenizer\.py --data demo"):
        pretrain.main(
            ['--tokens', folder_tokens, '--out', str(tmp_path / 'a'), '--steps', '1', *FAST]
        )
    with pytest.raises(SystemExit, match=rf'made for grid {GRID}, this run uses 14'):
        pretrain.main(
            ['--tokens', demo_tokens, '--out', str(tmp_path / 'b'), *FAST[2:], '--model', 'tiny']
        )
    with pytest.raises(SystemExit, match='--tokens is required'):
        pretrain.main(['--data', root])
    assert not os.path.exists(tmp_path / 'a' / 'ckpt.pt')


@pytest.mark.slow
def test_resume_of_another_run_is_refused(folder, tmp_path):
    run_folder(folder, tmp_path, '--steps', '1')
    with pytest.raises(SystemExit, match='with --model micro.*--model tiny.*pass --model micro'):
        run_folder(folder, tmp_path, '--resume', '--model', 'tiny')
    with pytest.raises(SystemExit, match='with --objective mapet.*asks for --objective mim'):
        run_folder(folder, tmp_path, '--resume', '--objective', 'mim')
    with pytest.raises(SystemExit, match='exists: pass --resume'):
        run_folder(folder, tmp_path)
    with pytest.raises(SystemExit, match='not divisible by 1 processes x --accum 3'):
        run_folder(folder, tmp_path / 'new', '--accum', '3')


@pytest.mark.slow
def test_resume_of_a_finished_run_writes_nothing(folder, tmp_path, capsys):
    run_folder(folder, tmp_path, '--steps', '2')
    before = {f: os.path.getmtime(tmp_path / f) for f in os.listdir(tmp_path)}
    summary = run_folder(folder, tmp_path, '--steps', '2', '--resume')
    assert 'is a finished run (step 2 of 2)' in capsys.readouterr().out
    assert summary['loss'] == state_of(tmp_path)['loss']
    assert {f: os.path.getmtime(tmp_path / f) for f in os.listdir(tmp_path)} == before


# ---------------------------------------------------------------------------------------------
# training.py pieces against their definitions


def test_schedule_warms_up_then_follows_the_cosine():
    def lr(s):
        return training.lr_at(s, total_steps=100, warmup_steps=10, peak_lr=1e-3, min_lr=1e-5,
                              warmup_lr=1e-6)

    assert lr(0) == pytest.approx(1e-6) and lr(5) == pytest.approx((1e-6 + 1e-3) / 2)
    assert lr(10) == pytest.approx(1e-3) and lr(100) == pytest.approx(1e-5)
    assert lr(55) == pytest.approx((1e-3 + 1e-5) / 2)  # half way down the cosine
    assert lr(30) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * 20 / 90)) / 2)


def test_param_groups_exempt_biases_norms_tokens_and_layer_scale():
    pre = model.Pretrainer(
        model.create_model('micro', depth=2, num_classes=0), 'mapet', vocab_size=16
    )
    pre.backbone.fc_norm.requires_grad_(False)
    groups = training.param_groups(
        pre, 0.05, lr_scale=lambda name: 0.5 if 'blocks.0.' in name else 1.0
    )
    names = {id(p): n for n, p in pre.named_parameters()}
    decayed = {names[id(p)] for g in groups if g['weight_decay'] == 0.05 for p in g['params']}
    exempt = {names[id(p)] for g in groups if g['weight_decay'] == 0 for p in g['params']}
    expected_decayed = {'backbone.patch_embed.proj.weight', 'decoder.weight'} | {
        f'backbone.blocks.{i}.{m}.weight'
        for i in range(2)
        for m in ('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2')
    }
    assert decayed == expected_decayed
    assert {
        'backbone.pos_embed',
        'backbone.cls_token',
        'mask_token',
        'backbone.blocks.0.ls1.gamma',
        'backbone.blocks.1.norm2.weight',
        'decoder.bias',
        'norm.weight',
    } <= exempt
    assert not any(n.startswith('backbone.fc_norm') for n in decayed | exempt)  # frozen: left out
    assert all(
        g['lr_scale'] == (0.5 if any('blocks.0.' in names[id(p)] for p in g['params']) else 1.0)
        for g in groups
    )


@pytest.mark.slow
def test_load_backbone_from_either_file_and_refuses_another_size(demo_run, tmp_path):
    _, _, out = demo_run
    a, report_a = training.load_backbone(
        os.path.join(out, 'ckpt.pt'), num_classes=5, drop_path_rate=0.0
    )
    b, _ = training.load_backbone(
        os.path.join(out, 'backbone.pt'),
        num_classes=5,
        drop_path_rate=0.0,
        expect=dict(img_size=32, embed_dim=MICRO['embed_dim']),
    )
    assert 'dropped pre-training parts: decoder, mask_token, norm' in report_a
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        if not k.startswith(('fc_norm', 'head')):
            assert torch.equal(v, w), k
    assert a.blocks[-1].drop_path.p == 0.0 and a.head.out_features == 5
    with pytest.raises(
        ValueError,
        match=rf"embed_dim {MICRO['embed_dim']} \(micro\); you asked for embed_dim 192 "
        r'.*pass --model micro',
    ):
        training.load_backbone(os.path.join(out, 'backbone.pt'), 5, expect=dict(embed_dim=192))
