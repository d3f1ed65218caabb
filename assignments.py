"""Course assignments: a student copy with key functions blanked, graded by the project's tests.

    python assignments.py list; python assignments.py make --out student [--only 1 3]
    cd student && python assignments.py check 1   # docs/assignments.md states each assignment
"""
import argparse
import ast
import json
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent
FALLBACK = ('*.py', '*.sh', '*.md', '*.txt*', 'pyproject.toml', 'tests/**/*', 'docs/**/*')
# number: (title, paper, {file:qualified name: the blank's message}, test file, its grading tests)
ASSIGNMENTS = {
    1: ('two-stream masks of PIM and MaPeT', 'Eq. 1-2, Fig. 2', {
        'model.py:build_masks': 'the content and query masks of Eq. 1-2'},
        'model', 'masks_equal_brute_force'),
    2: ('the two-stream block (needs 1)', 'Eq. 3', {
        'model.py:Block.two_stream': 'queries from [h; g], keys and values from h'}, 'model',
        'two_stream_information_flow one_call_attention_equals_two_call_reference'),
    3: ('MIM random and BEiT block-wise masking', 'Sec. 3, 5.1', {
        'model.py:random_mask': 'num_masked uniformly random patches each',
        'model.py:block_mask': "BEiT's block-wise mask of num_masked patches"}, 'model',
        'random_mask_ratio_and_uniformity block_mask_exact_count_and_blocky '
        'masked_pixels_have_zero_gradient'),
    4: ('k-means in torch with k-means++', 'Sec. 4.2', {
        'tokenizer.py:assign': "each row's nearest centroid, in chunks",
        'tokenizer.py:kmeans_plusplus': 'greedy k-means++ seeding, as scikit-learn'}, 'tokenizer',
        'kmeans_inertia_matches_sklearn lloyd_steps_match_sklearn_from_the_same_init '
        'assign_is_nearest_centroid_in_chunks empty_cluster_is_reseeded'),
    5: ('the linear probe', 'App. D', {
        'probe.py:LinearProbe.__init__': 'a frozen backbone, a new linear head',
        'probe.py:LinearProbe.train': 'the backbone stays in eval mode',
        'probe.py:LinearProbe.features': "the frozen backbone's pooled features"}, 'probe',
        'pixel_baseline_is_logistic_regression_on_the_normalised_pixels only_the_head_learns'),
    6: ('experiment: the reconstruction-ratio sweep', 'Tab. 6', {}, '', ''),
}


def fail(message):
    sys.exit(f'assignments.py: {message}')


def known(n):
    if n not in ASSIGNMENTS:
        fail(f'no assignment {n}: choose from 1-{len(ASSIGNMENTS)} (python assignments.py list)')
    return n


def find(tree, qualname):
    """The FunctionDef 'name' or 'Class.method' at the module's top level, or None."""
    for name in qualname.split('.'):
        tree = next((n for n in getattr(tree, 'body', []) if isinstance(
            n, (ast.FunctionDef, ast.ClassDef)) and n.name == name), None)
    return tree if isinstance(tree, ast.FunctionDef) else None


def blank(source, bodies):
    """Each {qualname: message} function's body after its docstring becomes a raise, spliced by
    line numbers: every other byte stays."""
    lines, tree, spans = source.splitlines(keepends=True), ast.parse(source), []
    for name, message in bodies.items():
        node = find(tree, name)
        first = node.body[0]
        start = first.end_lineno if ast.get_docstring(node) is not None else first.lineno - 1
        spans.append((start, node.end_lineno, ' ' * first.col_offset, message))
    for start, end, indent, message in sorted(spans, reverse=True):
        lines[start:end] = [f'{indent}raise NotImplementedError({message!r})\n']
    return ''.join(lines)


def tracked():
    try:
        files = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True,
                               check=True).stdout.decode().split('\0')
    except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout
        files = [str(f.relative_to(ROOT)) for pattern in FALLBACK for f in ROOT.glob(pattern)
                 if '__pycache__' not in f.parts]
    return sorted({f for f in files if (ROOT / f).is_file()} | {pathlib.Path(__file__).name})


def make(out, only):
    bodies = {}  # file -> {qualname: message}
    for n in map(known, only or ASSIGNMENTS):
        for target, hint in ASSIGNMENTS[n][2].items():
            file, name = target.split(':')
            if find(ast.parse((ROOT / file).read_text()), name) is None:
                fail(f'assignment {n} blanks {target}, which no longer exists: give its new name '
                     'in ASSIGNMENTS (assignments.py)')
            bodies.setdefault(file, {})[name] = f'Assignment {n}: {hint}'
    out = pathlib.Path(out)
    if out.exists() and any(out.iterdir()):
        fail(f'--out {out} is not empty: pick a new directory or remove it (rm -r {out})')
    for f in tracked():
        (out / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, out / f)
    for file, names in bodies.items():
        (out / file).write_text(blank((ROOT / file).read_text(), names))
    print(f'wrote {out}, {sum(map(len, bodies.values()))} functions blanked; grade with: '
          f'cd {out} && python assignments.py check N')


def check_sweep(results='runs/results.jsonl'):
    """Assignment 6: linear probes of MaPeT runs with at least 3 different --cut."""
    top1, path = {}, pathlib.Path(results)
    for row in map(json.loads, path.read_text().splitlines() if path.is_file() else []):
        run = pathlib.Path(row['checkpoint']).parent / 'args.json'
        args = json.loads(run.read_text())['args'] if run.is_file() else {}
        if row['method'].startswith('linear') and args.get('objective') == 'mapet':
            top1[args['cut']] = row['top1']  # the latest probe of each cut
    for cut, value in sorted(top1.items(), key=str):
        print(f'cut {cut}: top-1 {value:.2f} %')
    print(f'{len(top1)} cuts probed in {results}, 3 needed; the plot and the discussion are yours')
    return len(top1) >= 3


def check(n):
    _, _, _, file, names = ASSIGNMENTS[known(n)]
    ok = check_sweep() if not names else subprocess.run([
        sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-rpfE', '--tb=no',
        *(f'tests/test_{file}.py::test_{name}' for name in names.split())]).returncode == 0
    print(f'assignment {n}: {"passed" if ok else "failed"}')
    return 0 if ok else 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = p.add_subparsers(dest='command', required=True)
    sub.add_parser('list')
    m = sub.add_parser('make')
    m.add_argument('--out', required=True, help='a new directory')
    m.add_argument('--only', type=int, nargs='+', help='these assignments [all]')
    sub.add_parser('check').add_argument('n', type=int)
    args = p.parse_args(argv)
    if args.command != 'list':
        return check(args.n) if args.command == 'check' else make(args.out, args.only)
    for n, (title, paper, bodies, *_) in ASSIGNMENTS.items():
        names = ', '.join(t.split(':')[1] for t in bodies) or 'no code'
        print(f'{n}. {title} ({paper}): {names}; python assignments.py check {n}')


if __name__ == '__main__':
    sys.exit(main())
