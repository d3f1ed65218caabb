"""finetune.py and the evaluation it shares with probe.py (training.eval_loader, .evaluate):
end to end from a pretrain.py checkpoint and from scratch, layer-wise decay, exact distributed
evaluation against one process, the timm export, exact resume, and the clear refusals."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import timm
import torch

import data
import finetune
import model
import pretrain
import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ['--dtype', 'float32', '--workers', '0']


def torchrun(*argv, nproc=2):
    """Run `argv` under torchrun with `nproc` CPU processes (gloo); the CompletedProcess."""
    cmd = [
        sys.executable,
        '-m',
        'torch.distributed.run',
        '--standalone',
        f'--nproc_per_node={nproc}',
        *argv,
    ]
    result = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, 'PYTHONPATH': ROOT, 'OMP_NUM_THREADS': '1'},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_results(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def folder(make_demo_folder):
    """An ImageFolder of 32 px demo pictures, 30 train / 11 val images (11: not divisible by two
    processes), all 10 classes in each split, and the pixel tokens of its train split."""
    return make_demo_folder(train=30, val=11)


@pytest.fixture(scope='module')
def pretrained(folder, tmp_path_factory):
    """The run directory of a 2-step MaPeT pre-training of the micro ViT, through pretrain.py's
    command-line entry point: backbone.pt and ckpt.pt."""
    root, tokens = folder
    out = tmp_path_factory.mktemp('pretrain')
    pretrain.main(
        [
            '--objective',
            'mapet',
            '--data',
            root,
            '--tokens',
            tokens,
            '--out',
            str(out),
            '--steps',
            '2',
            '--batch-size',
            '8',
            '--model',
            'micro',
            *FAST,
        ]
    )
    return out


def finetune_folder(folder, out, *extra):
    root, _ = folder
    return finetune.main(
        [
            '--data',
            root,
            '--out',
            str(out),
            '--batch-size',
            '8',
            '--epochs',
            '2',
            '--lr',
            '0.5',
            '--warmup-epochs',
            '1',
            '--results',
            str(out / 'results.jsonl'),
            *FAST,
            *extra,
        ]
    )


# ---------------------------------------------------------------------------------------------
# End to end


@pytest.mark.slow
def test_command_fine_tunes_the_pretrained_backbone_on_demo(pretrained, tmp_path):
    """The real command in a fresh process: the backbone is loaded (and only fc_norm and head are
    new), every one of the 1,000 validation images is counted, the result line is appended."""
    results, out = tmp_path / 'results.jsonl', tmp_path / 'run'
    cmd = [
        sys.executable,
        'finetune.py',
        '--checkpoint',
        str(pretrained / 'backbone.pt'),
        '--out',
        str(out),
        '--steps',
        '2',
        '--batch-size',
        '32',
        '--results',
        str(results),
        *FAST,
    ]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'newly initialised: fc_norm, head' in result.stdout
    assert 'lr 0.016 x 32/1024 = 0.0005' in result.stdout  # Tab. 8's scaling rule, the demo's lr
    assert 'with strict=True' in result.stdout and 'result: method=finetune' in result.stdout
    [record] = read_results(results)
    assert record['method'] == 'finetune' and record['checkpoint'] == str(
        pretrained / 'backbone.pt'
    )
    assert (
        record['images'] == 1000
        and record['model'] == 'micro'
        and 0 <= record['top1'] <= record['top5'] <= 100
    )
    # Two warmup steps barely move the weights: the backbone is the pre-trained one, not a new one.
    backbone = torch.load(pretrained / 'backbone.pt', weights_only=True)['state_dict']
    tuned = torch.load(out / 'classifier.pt', weights_only=True)
    last = model.MODEL_CONFIGS['micro']['depth'] - 1
    for key in ('patch_embed.proj.weight', f'blocks.{last}.mlp.fc2.weight', 'pos_embed'):
        assert (tuned[key] - backbone[key]).abs().max() < 1e-3 < (backbone[key]).abs().max(), key
    log = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert [r['step'] for r in log] == [2] and log[0]['top1'] == record['top1']


@pytest.mark.slow
def test_from_scratch_on_demo(tmp_path):
    """--checkpoint none: the paper's "ViT" row (Tab. 2), the micro size for the demo."""
    summary = finetune.main(
        [
            '--checkpoint',
            'none',
            '--out',
            str(tmp_path),
            '--steps',
            '1',
            '--batch-size',
            '16',
            '--results',
            str(tmp_path / 'r.jsonl'),
            *FAST,
        ]
    )
    [record] = read_results(tmp_path / 'r.jsonl')
    assert (
        record['checkpoint'] == 'none' and record['model'] == 'micro' and record['images'] == 1000
    )
    assert summary['count'] == 1000 and summary['top1'] == record['top1']


# ---------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay (Tab. 8)


def test_layer_decay_scales_grow_with_depth_to_one_at_the_head():
    vit = model.create_model('micro', num_classes=10)
    depth = model.MODEL_CONFIGS['micro']['depth']
    groups = finetune.layer_decay_groups(vit, 0.05, 0.65)
    scale = {id(p): g['lr_scale'] for g in groups for p in g['params']}
    by_name = {name: scale[id(p)] for name, p in vit.named_parameters()}
    assert set(by_name) == {n for n, _ in vit.named_parameters()}  # every parameter is in a group
    for name in ('patch_embed.proj.weight', 'patch_embed.proj.bias', 'cls_token', 'pos_embed'):
        assert by_name[name] == pytest.approx(0.65 ** (depth + 1))
    for i in range(depth):
        block = {by_name[n] for n in by_name if n.startswith(f'blocks.{i}.')}
        assert block == {0.65 ** (depth - i)}
    assert by_name['fc_norm.weight'] == by_name['head.weight'] == by_name['head.bias'] == 1.0
    ladder = (
        [by_name['patch_embed.proj.weight']]
        + [by_name[f'blocks.{i}.attn.qkv.weight'] for i in range(depth)]
        + [by_name['head.weight']]
    )
    assert all(a < b for a, b in zip(ladder, ladder[1:]))  # strictly increasing with depth
    # ViT-T's recipe has no decay: one scale for all.
    assert {g['lr_scale'] for g in finetune.layer_decay_groups(vit, 0.05, 1.0)} == {1.0}


@pytest.mark.slow
def test_training_applies_the_scales(folder, pretrained, tmp_path):
    """What the optimizer ran with: every group's lr is the same scheduled lr times its scale."""
    finetune_folder(
        folder,
        tmp_path,
        '--checkpoint',
        str(pretrained / 'backbone.pt'),
        '--steps',
        '2',
        '--layer-decay',
        '0.5',
    )
    groups = training.load_checkpoint(str(tmp_path / 'ckpt.pt'))['optimizer']['param_groups']
    assert len({round(g['lr'] / g['lr_scale'], 12) for g in groups}) == 1
    depth = model.MODEL_CONFIGS['micro']['depth']  # embeddings, blocks, head: depth + 2 scales
    assert sorted({g['lr_scale'] for g in groups}) == [0.5**k for k in range(depth + 1, -1, -1)]


# ---------------------------------------------------------------------------------------------
# Exact distributed evaluation


@pytest.mark.parametrize('n', [0, 1, 7, 11, 1000])
@pytest.mark.parametrize('world', [1, 2, 3, 8])
def test_shards_partition_the_split_without_padding(n, world):
    cpu = torch.device('cpu')
    loaders = [training.eval_loader(range(n), 1, 0, training.Dist(r, r, world, cpu, r == 0))
               for r in range(world)]
    shards = [list(loader.sampler) for loader in loaders]
    assert sorted(i for shard in shards for i in shard) == list(range(n))
    assert [len(loader) for loader in loaders] == [len(s) for s in shards]


EVAL_SCRIPT = '''
import json, sys, torch, training
from torch.utils.data import TensorDataset
d = training.setup_distributed()
# 11 images, 4 classes: logits one-hot on a chosen class; image i is top-1 right iff i % 3 != 0.
labels = torch.arange(11) % 4
predicted = torch.where(torch.arange(11) % 3 != 0, labels, (labels + 1) % 4)
one_hot = torch.nn.functional.one_hot
logits = one_hot(predicted, 4).float() + one_hot(labels, 4) * 0.5
dataset = TensorDataset(logits, labels)
loader = training.eval_loader(dataset, 2, 0, d)
result = training.evaluate(torch.nn.Identity(), loader, d.device, torch.float32)
with open(f'{sys.argv[1]}/rank{d.rank}.json', 'w') as f:
    json.dump(result, f)
training.cleanup_distributed()
'''


@pytest.mark.slow
def test_evaluation_counts_every_image_once_on_two_processes(tmp_path):
    """11 images on 2 gloo processes: 11 counted (DistributedSampler would count 12), 7 right."""
    script = tmp_path / 'eval_check.py'
    script.write_text(textwrap.dedent(EVAL_SCRIPT))
    torchrun(str(script), str(tmp_path))
    results = [json.load(open(tmp_path / f'rank{rank}.json')) for rank in range(2)]
    assert results[0] == results[1]  # every rank gets the totals
    assert results[0]['count'] == 11
    assert results[0]['top1'] == pytest.approx(100 * 7 / 11) and results[0]['top5'] == 100


@pytest.mark.slow
def test_distributed_eval_only_matches_one_process(folder, pretrained, tmp_path):
    """--eval-only of a fine-tuned ckpt.pt on the 11 validation images: the same count and top-1
    on 2 processes as on one."""
    finetune_folder(
        folder, tmp_path / 'ft', '--checkpoint', str(pretrained / 'backbone.pt'), '--steps', '3'
    )
    root, _ = folder
    args = [
        '--checkpoint',
        str(tmp_path / 'ft' / 'ckpt.pt'),
        '--eval-only',
        '--data',
        root,
        '--batch-size',
        '4',
        *FAST,
    ]
    one = finetune.main([*args, '--results', str(tmp_path / 'one.jsonl')])
    torchrun('finetune.py', *args, '--results', str(tmp_path / 'two.jsonl'))
    [two] = read_results(tmp_path / 'two.jsonl')
    assert one['count'] == two['images'] == 11
    assert two['top1'] == pytest.approx(one['top1']) and two['top5'] == pytest.approx(one['top5'])
    assert two['method'] == 'eval'


# ---------------------------------------------------------------------------------------------
# The export loads into timm


@pytest.mark.slow
def test_exported_classifier_loads_into_timm_with_the_same_logits(folder, pretrained, tmp_path):
    finetune_folder(
        folder, tmp_path, '--checkpoint', str(pretrained / 'backbone.pt'), '--steps', '3'
    )
    info = json.load(open(tmp_path / 'classifier.json'))
    reference = eval(info['timm'], {'timm': timm})  # the call the run printed
    reference.load_state_dict(
        torch.load(tmp_path / 'classifier.pt', weights_only=True), strict=True
    )
    ours, _ = training.load_backbone(str(tmp_path / 'ckpt.pt'), num_classes=10)
    assert info['classes'] == sorted(data.DEMO_CLASSES) and info['config']['num_classes'] == 10
    images = torch.randn(4, 3, 32, 32)
    ours.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference(images), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_timm_call_of_the_paper_sizes_loads_strictly():
    vit = model.create_model('tiny', num_classes=7)
    call = finetune.timm_call(vit)
    assert call == ("timm.create_model('vit_tiny_patch16_224', global_pool='avg', "
                    'init_values=0.1, num_classes=7)')
    eval(call, {'timm': timm}).load_state_dict(vit.state_dict(), strict=True)


# ---------------------------------------------------------------------------------------------
# Exact resume


@pytest.mark.slow
def test_resume_is_exact(folder, pretrained, tmp_path):
    """4 steps straight == 2 steps + --resume + 2 steps, 3 steps to an epoch, with every
    augmentation of Tab. 8 on (crop, flip, RandAugment, erasing, mixup / cutmix, drop path)."""
    common = ['--checkpoint', str(pretrained / 'backbone.pt')]
    finetune_folder(folder, tmp_path / 'straight', *common, '--steps', '4')
    finetune_folder(folder, tmp_path / 'split', *common, '--steps', '2')
    finetune_folder(folder, tmp_path / 'split', *common, '--steps', '4', '--resume')
    a, b = (
        training.load_checkpoint(str(tmp_path / run / 'ckpt.pt')) for run in ('straight', 'split')
    )
    assert a['step'] == b['step'] == 4
    for key in a['model']:
        assert torch.equal(a['model'][key], b['model'][key]), key
    for i, state in a['optimizer']['state'].items():
        assert torch.equal(state['exp_avg'], b['optimizer']['state'][i]['exp_avg']), i


# ---------------------------------------------------------------------------------------------
# Refusals: one line, naming the fix


@pytest.mark.slow
def test_checkpoint_of_another_size_or_grid_is_refused(pretrained, tmp_path):
    backbone = str(pretrained / 'backbone.pt')
    with pytest.raises(
        SystemExit, match=r'finetune\.py: .*\(micro\); you asked for .*\(tiny\): pass --model micro'
    ):
        finetune.main(['--checkpoint', backbone, '--model', 'tiny', '--out', str(tmp_path / 'a')])
    p = model.MODEL_CONFIGS['micro']['patch_size']
    fine = str(tmp_path / 'half_patch.pt')  # the micro ViT with half its patch: a finer grid
    training.save_backbone(
        fine, model.create_model('micro', patch_size=p // 2), dict(objective='mapet')
    )
    with pytest.raises(SystemExit, match=rf'patch_size {p // 2} .*you asked for patch_size {p} '
                       r'\(micro\)'):
        finetune.main(['--checkpoint', fine, '--model', 'micro', '--out', str(tmp_path / 'b')])
    with pytest.raises(SystemExit, match=rf'no known size \(.*patch_size {p // 2}'):
        finetune.main(['--checkpoint', fine, '--out', str(tmp_path / 'c')])
    assert not any(os.path.exists(tmp_path / run) for run in 'abc')


@pytest.mark.slow
def test_user_mistakes_get_one_line(folder, pretrained, tmp_path):
    root, _ = folder
    cases = [
        (['--checkpoint', str(tmp_path / 'missing.pt')], 'no checkpoint file'),
        (
            ['--checkpoint', str(pretrained / 'backbone.pt'), '--eval-only'],
            'holds no classifier for the 10 classes',
        ),
        (['--checkpoint', 'none', '--reprob', '2'], r'--reprob must be in \[0, 1\]'),
        (['--checkpoint', 'none', '--eval-only'], 'takes neither --resume nor --checkpoint none'),
        (['--checkpoint', 'none', '--batch-size', '0'], '--batch-size must be positive'),
        (['--checkpoint', 'none', '--data', 'imagenet_typo'], 'unknown dataset'),
        (
            ['--checkpoint', 'none', '--data', root, '--batch-size', '64'],
            'fewer than one --batch-size',
        ),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=f'^finetune.py: .*{message}'):
            finetune.main([*argv, '--out', str(tmp_path / 'x'), *FAST])
    finetune_folder(
        folder, tmp_path / 'run', '--checkpoint', 'none', '--model', 'micro', '--steps', '1'
    )
    with pytest.raises(SystemExit, match='exported timm-layout state dict; pass the ckpt.pt'):
        finetune_folder(
            folder, tmp_path / 'y', '--checkpoint', str(tmp_path / 'run' / 'classifier.pt')
        )
    with pytest.raises(SystemExit, match='exists: pass --resume'):
        finetune_folder(folder, tmp_path / 'run', '--checkpoint', 'none')
