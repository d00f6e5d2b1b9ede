#!/usr/bin/env bash
# Reproduce docs/results.md: 3 seeds of each ML-100K preset, then a table of mean +- spread.
#   scripts/reproduce_results.sh [preset ...]     (default: ml-100k_retrieval ml-100k_ranking ml-100k_ranking_mlp_baseline)
# Needs the preprocessed data (python -m hstu.data.preprocess --dataset ml-100k --raw PATH).
# Runs go to runs/results/<preset>-seed<N>/ (metrics.csv, train.log); one run at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
NPROC=${NPROC:-2}
SEEDS=${SEEDS:-"1 2 3"}
PRESETS=("$@")
[ ${#PRESETS[@]} -eq 0 ] && PRESETS=(ml-100k_retrieval ml-100k_ranking ml-100k_ranking_mlp_baseline)

for preset in "${PRESETS[@]}"; do
  case "$preset" in *ranking*) entry=pretrain_gr_ranking.py ;; *) entry=pretrain_gr_retrieval.py ;; esac
  for seed in $SEEDS; do
    dir="runs/results/${preset}-seed${seed}"
    if [ -f "$dir/metrics.csv" ] && [ -f "$dir/wall_s" ]; then
      echo "[reproduce] $dir exists, skipping (delete it to rerun)"; continue
    fi
    rm -rf "$dir"; mkdir -p "$dir"
    echo "[reproduce] $preset seed $seed -> $dir"
    start=$(date +%s.%N)
    "$TORCHRUN" --standalone --nproc_per_node "$NPROC" "$entry" \
      --gin-config-file "configs/${preset}.gin" \
      --gin-param "TrainerArgs.seed=${seed}" \
      --gin-param "TrainerArgs.run_dir=\"${dir}\"" > "$dir/train.log" 2>&1
    end=$(date +%s.%N)
    "$PY" -c "print(f'{$end - $start:.1f}')" > "$dir/wall_s"
    grep -E "test split|final" "$dir/train.log" | tail -2 || true
  done
done

"$PY" - "${PRESETS[@]}" <<'PY'
import csv, sys, pathlib, statistics

print()
print("| preset | metric | mean | std | min | max | per seed | wall s (mean) |")
print("|---|---|---|---|---|---|---|---|")
for preset in sys.argv[1:]:
    runs = sorted(pathlib.Path("runs/results").glob(f"{preset}-seed*"))
    rows = {}
    walls = []
    for run in runs:
        with open(run / "metrics.csv") as f:
            m = [r for r in csv.DictReader(f) if r["split"] == "eval"]
        test = {r["name"][len("test/"):]: float(r["value"]) for r in m if r["name"].startswith("test/")}
        if test:  # retrieval with best-checkpoint selection: the test rows
            vals = test
        else:  # the final evaluation
            last = max(int(r["step"]) for r in m)
            vals = {r["name"]: float(r["value"]) for r in m if int(r["step"]) == last}
        for k, v in vals.items():
            rows.setdefault(k, []).append(v)
        walls.append(float((run / "wall_s").read_text()))
    keys = [k for k in ("HR@10", "NDCG@10", "HR@50", "NDCG@50", "MRR", "AUC") if k in rows]
    for k in keys:
        v = rows[k]
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"| {preset} | {k} | {statistics.mean(v):.4f} | {sd:.4f} | {min(v):.4f} | {max(v):.4f} | "
              + " ".join(f"{x:.4f}" for x in v) + f" | {statistics.mean(walls):.0f} |")
PY
