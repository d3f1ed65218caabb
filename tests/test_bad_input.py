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
import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ['--dtype', 'float32', '--workers', '0', '--device', 'cpu']


def demo_tokens(path, vocab=16, tokens=None, meta=None):
    """A token directory for the demo's train split (8x8 grid), written without the tokenizer."""
    tokens = np.zeros((5000, 8, 8), np.uint16) if tokens is None else tokens
    meta = dict(
        dataset='demo',
        split='train',
        num_images=5000,
        grid=8,
        vocab_size=vocab,
        features='pixels',
        skipped=[],
        **(meta or {}),
    )
    data.write_tokens(str(path), tokens, np.zeros((vocab, 4), np.float32), meta)
    return str(path)


def refusal(main, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return str(e.value)


def cases(tmp):
    good = demo_tokens(tmp / 'good')
    big = demo_tokens(tmp / 'big', tokens=np.full((5000, 8, 8), 20, np.uint16))  # vocabulary 16
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
    """`--model tiny` on the demo's grid-8 tokens: the message's command, pasted, makes the tokens
    the tiny ViT needs (grid 14, 16 px pixel patches), in a new directory the message names."""
    tokens = demo_tokens(tmp_path / 'demo')
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
    cmd = shlex.split(command)
    subprocess.run(
        [sys.executable, *cmd[1:], '--vocab', '16', '--sample', '0.01', '--iters', '2'],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=1200,
    )
    assert json.load(open(os.path.join(ROOT, new_dir, 'meta.json')))['grid'] == 14
    assert pretrain.main([*argv, '--tokens', os.path.join(ROOT, new_dir)])['step'] == 1
