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
    # bash's `time` reports the CPU seconds of every process it waited for (both ranks)
    { TIMEFORMAT="%U %S"; time "$TORCHRUN" --standalone --nproc_per_node "$NPROC" "$entry" \
      --gin-config-file "configs/${preset}.gin" \
      --gin-param "TrainerArgs.seed=${seed}" \
      --gin-param "TrainerArgs.run_dir=\"${dir}\"" > "$dir/train.log" 2>&1 ; } 2> "$dir/cpu_times"
    end=$(date +%s.%N)
    "$PY" -c "print(f'{$end - $start:.1f}')" > "$dir/wall_s"
    "$PY" -c "u, s = open('$dir/cpu_times').read().split()[-2:]; print(f'{float(u) + float(s):.1f}')" > "$dir/cpu_s"
    grep -E "test split|final" "$dir/train.log" | tail -2 || true
  done
done

"$PY" - "${PRESETS[@]}" <<'PY'
import csv, sys, pathlib, statistics

print()
print("| preset | metric | mean | std | min | max | per seed | wall s (mean) | CPU s (mean) |")
print("|---|---|---|---|---|---|---|---|---|")
KEYS = ("HR@10", "NDCG@10", "HR@50", "NDCG@50", "MRR", "AUC", "NE")
floor: dict[str, list[float]] = {}
floor_name = "popularity"
for preset in sys.argv[1:]:
    runs = sorted(pathlib.Path("runs/results").glob(f"{preset}-seed*"))
    rows: dict[str, list[float]] = {}
    walls, cpus = [], []
    for run in runs:
        with open(run / "metrics.csv") as f:
            all_rows = list(csv.DictReader(f))
        m = [r for r in all_rows if r["split"] == "eval"]
        test = {r["name"][len("test/"):]: float(r["value"]) for r in m if r["name"].startswith("test/")}
        if test:  # retrieval with best-checkpoint selection: the test rows
            vals = test
        else:  # the final evaluation
            last = max(int(r["step"]) for r in m)
            vals = {r["name"]: float(r["value"]) for r in m if int(r["step"]) == last}
        for k, v in vals.items():
            rows.setdefault(k, []).append(v)
        # the non-sequential floor on the same evaluation events (popularity / label prior)
        for r in all_rows:
            if r["split"] == "baseline" and r["name"] in KEYS:
                floor.setdefault(f"{'ranking' if 'ranking' in preset else 'retrieval'}|{r['name']}", []).append(float(r["value"]))
        walls.append(float((run / "wall_s").read_text()))
        cpu = run / "cpu_s"
        cpus.append(float(cpu.read_text()) if cpu.exists() else float("nan"))
    for k in [k for k in KEYS if k in rows]:
        v = rows[k]
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"| {preset} | {k} | {statistics.mean(v):.4f} | {sd:.4f} | {min(v):.4f} | {max(v):.4f} | "
              + " ".join(f"{x:.4f}" for x in v)
              + f" | {statistics.mean(walls):.0f} | {statistics.mean(cpus):.0f} |")
for key, v in floor.items():
    task, k = key.split("|")
    name = "popularity" if task == "retrieval" else "label prior"
    print(f"| floor ({name}, {task}) | {k} | {statistics.mean(v):.4f} | | | | | | |")
PY
