#!/bin/bash
# Seed the main study (study-v2) from pilot-distill-random: the same teacher preset, so the
# same teacher file, prefix cache, base scores and LoRA α=32 runs (the pilot's variant `lora`
# is the study's `lora`: same config, same splits). Only finished stages are copied, never
# over the study's own; rerun it when the pilot has finished more.
#   bash results/study-v2/seed_from_pilot.sh [PILOT_OUT] [STUDY_OUT]
set -e
src=${1:-/work/sweep-out/pilot-distill-random} dst=${2:-/work/sweep-out/study-v2}
mkdir -p $dst/teachers $dst/runs/reasoning-mix
cp -rn $src/prefix-cache $dst/
cp -rn $src/teachers/reasoning-mix $dst/teachers/
b=runs/reasoning-mix/base/test.json  # the base's scores, once the pilot has them
if [ -e $src/$b ] && [ ! -e $dst/$b ]; then mkdir -p $(dirname $dst/$b); cp $src/$b $dst/$b; fi
for run in $(cd $src && find runs/reasoning-mix/lora -name val.json -printf '%h\n'); do
  mkdir -p $dst/$run && cp -rn $src/$run/. $dst/$run/   # no clobber: new stages only
  rm -f $dst/$run/*.cost.json   # a pilot stage still running: not this study's cost
done
# the study's rate choices, under the lock its workers use (RateChoices)
flock $dst/lr_choices.lock python3 - "$src" "$dst" <<'PY'
import json, pathlib, sys
src = pathlib.Path(sys.argv[1]) / "lr_choices.json"
dst = pathlib.Path(sys.argv[2]) / "lr_choices.json"
s = json.loads(src.read_text())
d = json.loads(dst.read_text()) if dst.is_file() else {"k": {}, "searches": []}
for ds, by_v in s["k"].items():
    for r, k in by_v.get("lora", {}).items():
        d["k"].setdefault(ds, {}).setdefault("lora", {})[r] = k
have = {(x["dataset"], x["variant"], x["r"]) for x in d["searches"]}
d["searches"] += [x for x in s["searches"] if x["variant"] == "lora" and (x["dataset"], x["variant"], x["r"]) not in have]
dst.write_text(json.dumps(d, indent=1))
print(d["k"])
PY
