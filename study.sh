#!/usr/bin/env bash
# The demo study: a small-scale Tab. 1-2 on the built-in demo data (README "Demo study").
#
# Pre-trains mim, beit, pim and mapet for the same budget (micro ViT, 3 epochs, batch 128, the
# same seed), linear-probes each and a randomly initialised backbone, fine-tunes the mapet
# backbone and a random one, draws the curves, and prints the table. ~21 min on 2 CPU cores.
#
#     bash study.sh                # everything in runs/study
#     SEED=1 bash study.sh         # another seed, in runs/study_seed1
set -euo pipefail
cd "$(dirname "$0")"
SEED=${SEED:-0}
OUT=${OUT:-runs/study$([ "$SEED" = 0 ] || echo "_seed$SEED")}
RESULTS=$OUT/results.jsonl
mkdir -p "$OUT"
rm -f "$RESULTS"

for objective in mim beit pim mapet; do
    if [ ! -f "$OUT/pretrain_$objective/backbone.pt" ]; then
        rm -rf "$OUT/pretrain_$objective"
        python pretrain.py --objective "$objective" --seed "$SEED" --out "$OUT/pretrain_$objective"
    fi
done

python probe.py --checkpoint none --seed "$SEED" --results "$RESULTS"
for objective in mim beit pim mapet; do
    python probe.py --checkpoint "$OUT/pretrain_$objective/backbone.pt" --seed "$SEED" --results "$RESULTS"
done

for checkpoint in none "$OUT/pretrain_mapet/backbone.pt"; do
    name=$([ "$checkpoint" = none ] && echo scratch || echo mapet)
    rm -rf "$OUT/finetune_$name"
    python finetune.py --checkpoint "$checkpoint" --seed "$SEED" --out "$OUT/finetune_$name" --results "$RESULTS"
done

python visualize.py curves "$OUT"/pretrain_{mim,beit,pim,mapet}/log.jsonl --labels mim,beit,pim,mapet --out "$OUT"

python - "$RESULTS" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print('| method | checkpoint | seed | top-1 | top-5 | epochs | wall time |')
print('|---|---|---|---|---|---|---|')
for r in rows:
    print(f"| {r['method']} | {r['checkpoint']} | {r['seed']} | {r['top1']:.1f} | {r['top5']:.1f} | {r['epochs']} | {r['seconds']:.0f} s |")
EOF
