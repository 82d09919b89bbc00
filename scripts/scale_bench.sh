#!/usr/bin/env bash
# Wall time and peak RSS of each step of a compression on a classifier of a real model's shape
# (bert-base, roberta-base, bert-large) with seeded random weights: only time and memory mean
# anything here (docs/results/scale.md).
#
#   scripts/scale_bench.sh SHAPE WORK_DIR [STEP...]
#
# Steps (default: all, in this order): eval analyze prune quantize recover export.
# Environment: AXCOMPRESS (binary, default target/release/axcompress), DATA (SST-2 directory,
# default ../shared/data/glue/SST-2, else demo/data/SST-2), HOLDOUT (selection sentences, default
# 2000), BUDGET_PASSES (analyze --budget-passes, default none), BUDGET (prune --budget, default
# 8), ANALYSIS_BUDGET (prune --analysis-budget, default none), RECOVER (recover sentences, default 8000), THREADS
# (default 2). Appends one line per step to WORK_DIR/times.tsv: step, shape, wall s, peak RSS MB.
set -euo pipefail
cd "$(dirname "$0")/.."
shape=${1:?usage: scale_bench.sh SHAPE WORK_DIR [STEP...]}
work=${2:?usage: scale_bench.sh SHAPE WORK_DIR [STEP...]}
shift 2
steps=${*:-eval analyze prune quantize recover export}
bin=${AXCOMPRESS:-target/release/axcompress}
data=${DATA:-../shared/data/glue/SST-2}
[ -d "$data" ] || data=demo/data/SST-2
holdout=${HOLDOUT:-2000}
threads=${THREADS:-2}
model=$work/$shape
mkdir -p "$work"
if [ ! -d "$model" ]; then
    cargo run --release --quiet --example scale_fixture -- "$shape" "$model"
fi
common=(--model "$model" --task sst2 --data "$data" --threads "$threads" --quiet)

# Runs one step under /usr/bin/time and records its wall time and peak RSS.
step() {
    local name=$1
    shift
    local stats=$work/$name.time
    if /usr/bin/time -f "%e %M" -o "$stats" "$@" >"$work/$name.log" 2>&1; then
        read -r wall kb <"$stats"
        printf '%s\t%s\t%s\t%d\n' "$name" "$shape" "$wall" $((kb / 1024)) | tee -a "$work/times.tsv"
    else
        echo "$name failed: see $work/$name.log" >&2
        return 1
    fi
}

for s in $steps; do
    case $s in
    eval) step eval "$bin" eval "${common[@]}" ;;
    analyze)
        step analyze "$bin" analyze "${common[@]}" --holdout "$holdout" \
            --levels blocks,heads,groups ${BUDGET_PASSES:+--budget-passes "$BUDGET_PASSES"} \
            --out "$work/significance.json" --force
        ;;
    prune)
        step prune "$bin" prune "${common[@]}" --holdout "$holdout" --mode speed --max-drop 1 \
            --budget "${BUDGET:-8}" ${ANALYSIS_BUDGET:+--analysis-budget "$ANALYSIS_BUDGET"} \
            --out "$work/pruned" --force
        ;;
    quantize) step quantize "$bin" quantize "${common[@]}" --bits 8 --out "$work/int8" --force ;;
    recover)
        cat >"$work/recover.toml" <<TOML
model = "$model"
task = "sst2"
[selection]
on = "train-perturbed"
holdout = $holdout
[[stages]]
pass = "recover"
train_limit = ${RECOVER:-8000}
epochs = 1
TOML
        step recover "$bin" compress --config "$work/recover.toml" "${common[@]}" \
            --out "$work/recovered" --force
        ;;
    export) step export "$bin" export --model "$model" --format onnx --out "$work/onnx" --force ;;
    *) echo "unknown step $s" >&2 && exit 2 ;;
    esac
done
