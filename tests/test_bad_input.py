"""Every bad input of pretrain.py / finetune.py ends the command with ONE line that names what is
wrong (and the file, where a file is at fault) before any training; a suggested command works."""

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

import data
import finetune
import model
import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ['--dtype', 'float32', '--workers', '0', '--device', 'cpu']
MICRO = model.MODEL_CONFIGS['micro']  # the demo's ViT: its token grid and the train split
SHAPE = (data.DEMO_SIZES['train'], *[MICRO['img_size'] // MICRO['patch_size']] * 2)


def demo_tokens(path, vocab=16, tokens=None, meta=None, features='hog'):
    """A token directory for the demo's train split at the micro ViT's grid (HOG, as the demo
    makes, unless told), written without the tokenizer."""
    tokens = np.zeros(SHAPE, np.uint16) if tokens is None else tokens
    meta = dict(
        dataset='demo',
        split='train',
        num_images=SHAPE[0],
        grid=SHAPE[1],
        vocab_size=vocab,
        features=features,
        skipped=[],
        **(meta or {}),
    )
    data.write_tokens(str(path), tokens, np.zeros((vocab, 9), np.float32), meta)
    return str(path)


def refusal(main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return str(e.value)


def cases(tmp):
    good = demo_tokens(tmp / 'good')
    big = demo_tokens(tmp / 'big', tokens=np.full(SHAPE, 20, np.uint16))  # vocabulary 16
    bad_json = demo_tokens(tmp / 'json')
    (tmp / 'json' / 'meta.json').write_text('{"dataset": "demo",')
    short = demo_tokens(tmp / 'short')
    path = tmp / 'short' / 'tokens.npy'
    path.write_bytes(path.read_bytes()[:5000])
    (tmp / 'random.pt').write_bytes(os.urandom(4096))
    pre = ['--tokens', good, '--out', str(tmp / 'p'), *FAST]
    ft = ['--checkpoint', 'none', '--out', str(tmp / 'f'), '--results', str(tmp / 'r'), *FAST]
    return [  # (main, argv, what the line must say, the file it must name)
        *[
            (pretrain.main, [*pre, flag, '-1'], f'{flag} must not be negative', None)
            for flag in (
                '--clip-grad',
                '--warmup-epochs',
                '--min-lr',
                '--weight-decay',
                '--color-jitter',
                '--workers',
            )
        ],
        (pretrain.main, [*pre, '--drop-path', '2'], r'--drop-path must be in \[0, 0.99\]', None),
        (finetune.main, [*ft, '--drop-path', '2'], r'--drop-path must be in \[0, 0.99\]', None),
        (finetune.main, [*ft, '--workers', '-1'], '--workers must not be negative', None),
        (pretrain.main, [*pre, '--device', 'gpu0'], '--device gpu0 is not a device', None),
        (pretrain.main, [*pre[2:], '--tokens', big], 'outside the vocabulary of 16', big),
        (pretrain.main, [*pre[2:], '--tokens', bad_json], 'not valid JSON', bad_json),
        (pretrain.main, [*pre[2:], '--tokens', short], 'damaged', short),
        (
            finetune.main,
            [*ft[2:], '--checkpoint', str(tmp / 'random.pt')],
            'not a readable checkpoint of this project',
            str(tmp / 'random.pt'),
        ),
    ]


def test_each_bad_input_gets_one_line_naming_the_file(tmp_path):
    for main, argv, message, path in cases(tmp_path):
        line = refusal(main, argv)
        script = 'pretrain.py' if main is pretrain.main else 'finetune.py'
        assert re.match(f'^{script}: .*{message}', line), (argv, line)
        assert '\n' not in line and 'Traceback' not in line and 'weights_only' not in line, line
        assert path is None or path in line, (path, line)
    assert not os.path.exists(tmp_path / 'p' / 'ckpt.pt')


@pytest.mark.slow
def test_the_suggested_tokenizer_command_makes_the_run_pass(tmp_path):
    """`--model tiny` on micro-grid demo tokens: the message's command, pasted, makes the tokens
    the tiny ViT needs (grid 14, the same features of 16 px patches), in a new directory it names.
    Run on pixel tokens (HOG at 224 px takes twice as long); HOG tokens get the HOG command."""
    tokens = demo_tokens(tmp_path / 'demo', features='pixels')
    argv = [
        '--model',
        'tiny',
        '--out',
        str(tmp_path / 'run'),
        '--steps',
        '1',
        '--batch-size',
        '4',
        *FAST,
    ]
    line = refusal(pretrain.main, [*argv, '--tokens', tokens])
    command, new_dir = re.search(r'run `([^`]+)` and pass --tokens (\S+)', line).groups()
    assert '--grid 14' in command and '--patch 16' in command and new_dir != tokens
    assert '--features pixels' in command  # the features of the tokens it replaces
    hog = refusal(pretrain.main, [*argv, '--tokens', demo_tokens(tmp_path / 'hog')])
    assert re.search(r'run `[^`]* --features hog --patch 16 ', hog), hog
    cmd = shlex.split(command)
    subprocess.run(
        [sys.executable, *cmd[1:], '--vocab', '16', '--sample', '0.01', '--iters', '2'],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=1200,
    )
    meta = json.load(open(os.path.join(ROOT, new_dir, 'meta.json')))
    assert (meta['grid'], meta['features']) == (14, 'pixels')
    assert pretrain.main([*argv, '--tokens', os.path.join(ROOT, new_dir)])['step'] == 1
