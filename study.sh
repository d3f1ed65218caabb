#!/usr/bin/env bash
# The demo study: a small Tab. 1-2 on the built-in demo data, over seeds (README "Demo study").
#
# Per seed, at the quick start's budget: pre-trains mim, beit, pim, mapet and cae; linear-probes
# each, a random backbone and the raw pixels; fine-tunes the mapet backbone and a random one for
# the quick start's 4 epochs, and a random one for 12 (the supervised ceiling). Then the table of
# mean +- std over the seeds. ~21 min per seed on 2 CPU cores.
#
#     bash study.sh                  # seeds 0 1 2, in runs/study
#     SEEDS=3 OUT=runs/s3 bash study.sh
set -euo pipefail
cd "$(dirname "$0")"
SEEDS=${SEEDS:-0 1 2}
OUT=${OUT:-runs/study}
RESULTS=$OUT/results.jsonl
mkdir -p "$OUT"
rm -f "$RESULTS"

for seed in $SEEDS; do
    dir=$OUT/seed$seed
    for objective in mim beit pim mapet cae; do
        if [ ! -f "$dir/pretrain_$objective/backbone.pt" ]; then
            rm -rf "$dir/pretrain_$objective"
            python pretrain.py --objective "$objective" --seed "$seed" --out "$dir/pretrain_$objective"
        fi
    done
    for checkpoint in none pixels "$dir"/pretrain_{mim,beit,pim,mapet,cae}/backbone.pt; do
        python probe.py --checkpoint "$checkpoint" --seed "$seed" --results "$RESULTS"
    done
    for run in scratch:none:4 mapet:"$dir/pretrain_mapet/backbone.pt":4 ceiling:none:12; do
        IFS=: read -r name checkpoint epochs <<< "$run"
        rm -rf "$dir/finetune_$name"
        python finetune.py --checkpoint "$checkpoint" --epochs "$epochs" --seed "$seed" \
            --out "$dir/finetune_$name" --results "$RESULTS"
    done
done

first=${SEEDS%% *}  # the curves of the first seed
python visualize.py curves "$OUT/seed$first"/pretrain_{mim,beit,pim,mapet,cae}/log.jsonl \
    --labels mim,beit,pim,mapet,cae --out "$OUT"

python - "$RESULTS" <<'EOF'
import collections, json, os, statistics, sys
rows = collections.defaultdict(list)
for r in map(json.loads, open(sys.argv[1])):
    start = os.path.basename(os.path.dirname(r['checkpoint'])).replace('pretrain_', '')
    rows[r['method'], start if '/' in r['checkpoint'] else r['checkpoint'], r['epochs']].append(r)
print('| method | from | epochs | top-1 (mean ± std) | seeds | per seed | time |')
print('|---|---|---|---|---|---|---|')
for (method, start, epochs), rs in rows.items():
    top1 = [r['top1'] for r in rs]
    std = statistics.stdev(top1) if len(top1) > 1 else float('nan')
    print(f"| {method} | {start} | {epochs:g} | {statistics.mean(top1):.1f} ± {std:.1f} | "
          f"{len(rs)} | {' / '.join(f'{t:.1f}' for t in top1)} | "
          f"{statistics.mean(r['seconds'] for r in rs):.0f} s |")
EOF
