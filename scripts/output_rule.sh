#!/usr/bin/env bash
# The output rule, shown on a temporary tree: an input model (P/model) beside an unrelated file,
# the data (d/SST-2), a config naming both (cfg/c.toml), an unrelated file (f.txt), a directory
# axcompress did not write (other/), an earlier output of axcompress (ours/) and an empty
# directory (empty/). Every placement of `--out`, without and with `--force`: the exit status,
# the one-line answer, and whether any file that existed before changed (sha256 of every file,
# before and after; the run's own output directory is listed apart).
#
#   scripts/output_rule.sh [path/to/axcompress]    (default: target/release/axcompress)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-$repo/target/release/axcompress}"
root="$(mktemp -d)"
err="$(mktemp)"
trap 'rm -rf "$root" "$err"' EXIT
cd "$root"

mkdir -p P/model d/SST-2 cfg other empty
cp "$repo"/demo/model/* P/model/
echo "keep me" > P/unrelated.txt
head -41 "$repo/demo/data/SST-2/dev.tsv" > d/SST-2/dev.tsv
head -41 "$repo/demo/data/SST-2/train.tsv" > d/SST-2/train.tsv
printf 'model = "../P/model"\ndata = "../d/SST-2"\ntask = "sst2"\n\n[[stages]]\npass = "quantize"\nbits = "8"\n' > cfg/c.toml
echo "a file" > f.txt
echo "not ours" > other/notes.txt
"$bin" compress --config cfg/c.toml --out ours -q > /dev/null

sums() { find . -type f ! -path './new/*' ! -path './empty/*' -print0 | sort -z | xargs -0 sha256sum; }
inputs() { find P d cfg f.txt other -type f -print0 | sort -z | xargs -0 sha256sum; }
before_all="$(inputs)"
echo "before: sha256 of the inputs and unrelated files"
echo "$before_all"
echo
printf '| --out | --force | exit | answer | files changed |\n|---|---|---|---|---|\n'
for out in P/model P P/model/sub d/SST-2 d d/SST-2/x cfg cfg/c.toml f.txt other ours empty new .; do
  for force in "" "--force"; do
    before="$(sums)"
    set +e
    "$bin" compress --config cfg/c.toml --out "$out" $force -q > /dev/null 2> "$err"
    code=$?
    set -e
    answer="$(head -c 160 "$err" | head -1)"
    after="$(sums)"
    # Files that existed before and changed or vanished; a run that wrote its output may
    # replace what was under --out (an earlier output of its own), nothing else.
    gone="$(diff <(echo "$before") <(echo "$after") | grep '^<' || true)"
    if [ "$code" = 0 ] || [ "$code" = 3 ]; then
      gone="$(echo "$gone" | grep -v "  ./$out/" || true)"
    fi
    changed="$(echo -n "$gone" | grep -c . || true)"
    [ -z "$answer" ] && answer="wrote $out"
    printf '| %s | %s | %s | %s | %s |\n' "$out" "${force:-no}" "$code" "${answer//|/\\|}" "$changed"
    # Put the tree back where a run wrote a new output, so every case starts alike.
    case "$out" in new|empty) rm -rf "$out"; mkdir -p empty ;; esac
  done
done
echo
echo "after all $(( 14 * 2 )) cases: sha256 of the inputs and unrelated files"
inputs
if [ "$(inputs)" = "$before_all" ]; then
  echo "identical to before: no input or unrelated file changed"
else
  echo "CHANGED:"; diff <(echo "$before_all") <(inputs); exit 1
fi
