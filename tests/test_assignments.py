"""assignments.py: the student copy keeps every byte but the blanked bodies, imports, fails the
blanked assignment's check where the reference passes, still pre-trains around the blanks, and
an unknown number or a renamed function is refused by name."""
import ast
import difflib
import json
import pathlib
import subprocess
import sys

import pytest

import assignments

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLANKED = {'model.py': ['Block.two_stream'], 'tokenizer.py': ['assign', 'kmeans_plusplus']}


@pytest.fixture(scope='module')
def student(tmp_path_factory):
    out = tmp_path_factory.mktemp('student') / 'copy'
    assignments.main(['make', '--out', str(out), '--only', '2', '4'])
    return out


def python(cwd, *args):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.mark.parametrize('file', sorted(BLANKED))
def test_only_the_bodies_change(student, file):
    ref, ours = (ROOT / file).read_text(), (student / file).read_text()
    spans = []  # 0-based lines of each reference body after its docstring
    for name in BLANKED[file]:
        r, o = assignments.find(ast.parse(ref), name), assignments.find(ast.parse(ours), name)
        assert ast.dump(o.args) == ast.dump(r.args) and ast.get_docstring(o) == ast.get_docstring(r)
        assert [type(s) for s in o.body] == [ast.Expr, ast.Raise]  # docstring, raise
        assert f"Assignment {2 if file == 'model.py' else 4}: " in ast.unparse(o.body[1])
        spans.append(range(r.body[1].lineno - 1, r.end_lineno))
    opcodes = difflib.SequenceMatcher(None, ref.splitlines(), ours.splitlines(), False)
    for tag, i1, i2, j1, j2 in opcodes.get_opcodes():
        if tag != 'equal':
            assert any(i1 in s and i2 - 1 in s for s in spans), ref.splitlines()[i1:i2]
            assert all('raise NotImplementedError' in line for line in ours.splitlines()[j1:j2])
    assert (student / 'probe.py').read_bytes() == (ROOT / 'probe.py').read_bytes()


def test_the_copy_imports_and_pretrains_around_the_blanks(student, make_demo_folder, tmp_path):
    """Assignments 2 and 4 blanked: MIM pre-training on existing tokens needs neither."""
    root, tokens = make_demo_folder(train=16)
    run = python(student, 'pretrain.py', '--objective', 'mim', '--data', root, '--tokens',
                 tokens, '--out', str(tmp_path), '--steps', '2', '--batch-size', '8',
                 '--model', 'micro', '--dtype', 'float32', '--workers', '0')
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / 'backbone.pt').is_file()
    run = python(student, '-c', 'import probe, torch, tokenizer as t; '
                 't.assign(torch.zeros(2, 3), torch.zeros(4, 3))')
    assert 'NotImplementedError: Assignment 4: ' in run.stderr


@pytest.mark.parametrize('n', [2, pytest.param(4, marks=pytest.mark.slow)])
def test_check_fails_in_the_copy_and_passes_in_the_reference(student, n):
    runs = [subprocess.Popen([sys.executable, 'assignments.py', 'check', str(n)], cwd=cwd,
                             stdout=subprocess.PIPE, text=True) for cwd in (student, ROOT)]
    (theirs, _), (ours, _) = [run.communicate(timeout=300) for run in runs]  # side by side
    assert runs[0].returncode == 1 and f'assignment {n}: failed' in theirs
    assert 'FAILED tests/test_' in theirs and 'PASSED' not in theirs
    assert runs[1].returncode == 0 and f'assignment {n}: passed' in ours, ours[-3000:]


def test_make_refuses_an_unknown_number_or_a_renamed_function(tmp_path, monkeypatch):
    run = python(ROOT, 'assignments.py', 'make', '--out', str(tmp_path / 'a'), '--only', '1', '9')
    assert run.returncode == 1 and run.stderr.splitlines() == [
        'assignments.py: no assignment 9: choose from 1-6 (python assignments.py list)']
    with pytest.raises(SystemExit, match='no assignment 0'):
        assignments.main(['check', '0'])
    monkeypatch.setitem(assignments.ASSIGNMENTS, 3, ('t', 'Sec. 3', {
        'model.py:random_mask': 'x', 'model.py:Block.two_streams': 'y'}, 'model', 'x'))
    with pytest.raises(SystemExit, match=r'assignment 3 blanks model.py:Block.two_streams, which '):
        assignments.main(['make', '--out', str(tmp_path / 'b'), '--only', '3'])
    assert not (tmp_path / 'b').exists()
    (tmp_path / 'notes.txt').write_text('a teacher\'s file')
    with pytest.raises(SystemExit, match=f'--out {tmp_path} is not empty'):
        assignments.main(['make', '--out', str(tmp_path), '--only', '1'])


def test_without_git_the_copy_has_the_code_tests_and_vocabulary(monkeypatch):
    def no_git(*args, **kwargs):
        raise OSError('git: not found')
    monkeypatch.setattr(assignments.subprocess, 'run', no_git)
    files = assignments.tracked()
    assert {'model.py', 'assignments.py', 'tests/conftest.py', 'requirements.txt',
            'pyproject.toml', 'bpe_simple_vocab_16e6.txt.gz'} <= set(files)
    assert not [f for f in files if f.startswith('runs/') or '__pycache__' in f]


@pytest.mark.parametrize('cuts, status', [([2, 3, 8], 0), ([2, 2, 8], 1)])
def test_check_6_wants_probes_of_three_cuts(tmp_path, monkeypatch, capsys, cuts, status):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'runs').mkdir()
    with open('runs/results.jsonl', 'w') as f:
        for i, cut in enumerate(cuts):
            run = tmp_path / 'runs' / f'cut{i}'
            run.mkdir()
            (run / 'args.json').write_text(json.dumps({'args': {'objective': 'mapet', 'cut': cut}}))
            f.write(json.dumps({'method': 'linear-cached', 'checkpoint': str(run / 'backbone.pt'),
                                'top1': 10.0 + i}) + '\n')
    assert assignments.check(6) == status
    assert 'cut 8: top-1 12.00 %' in capsys.readouterr().out
