#!/usr/bin/env bash
# Runs one command per pass on the demo model with two axcompress binaries and compares what
# they write: model.safetensors, config.json, tokenizer.json and report.json must be byte-identical
# (timings live in timing.json, which is not compared). For refactors that must not change outputs.
#
#   scripts/same_outputs.sh OLD_BINARY NEW_BINARY [WORK_DIR]
#
# Takes about 3 minutes per binary on 2 cores. Exit status 1 if any file differs.
set -u
old=$1 new=$2 work=${3:-$(mktemp -d)}
cd "$(dirname "$0")/.."
m=demo/model d=demo/data/SST-2
outputs() {
    local bin=$1 o=$2
    rm -rf "$o" && mkdir -p "$o"
    run() { local name=$1; shift; "$bin" "$@" -q >"$o/$name.log" 2>&1; echo "$name exit $?" >>"$o/exits"; }
    run demo compress --config configs/demo.toml --out "$o/demo"
    run prune prune -m $m -t sst2 -d $d --mode size --max-drop 2 --limit 200 --levels heads,groups --out "$o/prune"
    run recover prune -m $m -t sst2 -d $d --mode speed --max-drop 2 --limit 200 --levels heads --recover 300 --augment 0.1 --out "$o/recover"
    run int4 quantize -m $m -t sst2 -d $d --bits 4 --max-drop 2 --limit 200 --out "$o/int4"
    run mixed quantize -m $m -t sst2 -d $d --bits mixed --max-drop 2 --limit 200 --no-compare --out "$o/mixed"
    run attention attention -m $m -t sst2 -d $d --method sign-match --k 0.5 --max-drop 2 --limit 200 --out "$o/attention"
    run vocab quantize -m $m -t sst2 -d $d --bits 8 --vocab corpus --limit 200 --out "$o/vocab"
    cat >"$o/bsp.toml" <<TOML
model = "$PWD/$m"
data = "$PWD/$d"
task = "sst2"
max_drop = 5.0
[selection]
on = "dev"
limit = 200
[[stages]]
pass = "bsp"
ratio = 0.25
[stages.lasso]
train_limit = 200
[stages.retrain]
train_limit = 200
TOML
    run bsp compress --config "$o/bsp.toml" --out "$o/bsp"
}
outputs "$old" "$work/old"
outputs "$new" "$work/new"
status=0
cmp -s "$work/old/exits" "$work/new/exits" || { echo "exit statuses differ"; status=1; }
for dir in "$work"/old/*/; do
    name=$(basename "$dir")
    for file in model.safetensors config.json tokenizer.json report.json; do
        [ -f "$dir/$file" ] || continue
        if cmp -s "$dir/$file" "$work/new/$name/$file"; then
            echo "same       $name/$file"
        else
            echo "DIFFERENT  $name/$file"; status=1
        fi
    done
done
exit $status
