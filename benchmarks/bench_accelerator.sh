#!/usr/bin/env bash
# Runs jaxbn's benchmarks on an accelerator (a GPU) in one command and prints
# the ratios against Flax and the device-memory (HBM) bandwidth floor.
#
#   benchmarks/bench_accelerator.sh               # on a machine with a GPU
#   benchmarks/bench_accelerator.sh --cpu-smoke   # tiny run on the CPU: checks the
#                                                 # wiring only, numbers meaningless
#
# NOT YET RUN ON A GPU: it was written on a CPU-only machine and checked there
# with --cpu-smoke only. The figures it prints on a GPU are not in RESULTS.md
# until someone with a GPU runs it and records them with the device named.
#
# What it runs (each script's own flags; JAX_PLATFORMS pins JAX to the device):
#   bench_op.py --platform gpu   the batch-norm training step against Flax (and
#                                PyTorch on CUDA where it has CUDA), with the
#                                floor: 8 x-sized passes at the bandwidth of a
#                                jitted negation on the device
#   bench_train.py               MLP training steps/s and compiled temporary
#                                memory against Flax
#   bench_fused.py               batch norm fused with its activation, memory
#                                against Flax
#   bench_cnn.py                 the CNN: steps/s and memory against Flax
# The JSON of every run goes to $OUT_DIR (default benchmarks/results/accelerator-<time>),
# then a summary prints each target (MET / NOT MET, with its ratio) and the op's
# time over the floor. The PyTorch contenders of the training benchmarks are
# CPU-only: they are left out of a GPU run (they would not measure the device).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mode=gpu
case "${1:-}" in
  --cpu-smoke) mode=cpu-smoke ;;
  "") ;;
  -h|--help) sed -n '2,26p' "${BASH_SOURCE[0]}"; exit 0 ;;
  *) echo "unknown argument: $1 (expected --cpu-smoke or nothing)" >&2; exit 2 ;;
esac
py="${PYTHON:-python}"
out="${OUT_DIR:-$here/results/accelerator-$(date -u +%Y%m%dT%H%M%SZ)}"

if [[ $mode == gpu ]]; then
  export JAX_PLATFORMS=cuda
  if ! "$py" -c 'import jax, sys; sys.exit(jax.default_backend() != "gpu")' 2>/dev/null; then
    echo "no GPU visible to JAX (JAX_PLATFORMS=cuda failed): nothing run." >&2
    echo "Use --cpu-smoke to check the wiring on the CPU." >&2
    exit 1
  fi
  op=(--platform gpu)
  train=(--contenders jaxbn-scan jaxbn-jit jaxbn-remat-jit reference-jit flax-jit)
  fused=()
  cnn=(--contenders jaxbn-scan jaxbn-jit flax-jit)
else
  export JAX_PLATFORMS=cpu
  op=(--platform cpu --quick --shapes 64x16:float32 64x16:bfloat16 --contenders jaxbn flax)
  train=(--quick --models paper --contenders jaxbn-jit flax-jit)
  fused=(--quick)
  cnn=(--quick --contenders jaxbn-jit flax-jit)
fi

# Created only now: a run refused above leaves nothing behind.
mkdir -p "$out"
"$py" -c 'import jax; d = jax.devices()[0]; print(f"device   {d.platform}: {d.device_kind}")'
# A benchmark that fails is reported and the others still run.
failed=()
run() {
  local name=$1; shift
  echo "+ $py $*" >&2
  "$py" "$@" --json "$out/$name.json" || failed+=("$name")
}
run op "$here/bench_op.py" "${op[@]}"
run train "$here/bench_train.py" "${train[@]}"
run fused "$here/bench_fused.py" "${fused[@]}"
run cnn "$here/bench_cnn.py" "${cnn[@]}"

"$py" - "$out" <<'EOF'
import json, os, sys

out = sys.argv[1]
print(f"\nsummary ({out})")
def load(name):
    path = os.path.join(out, f"{name}.json")
    if not os.path.exists(path):
        print(f"  {name:<6} FAILED (no results; see its output above)")
        return None
    with open(path) as f:
        return json.load(f)


op = load("op") or {"cases": []}
if op["cases"]:
    print(f"device   {op.get('device')}, bandwidth {op['copy_bandwidth_Bps'] / 1e9:.1f} GB/s")
for case in op["cases"]:
    c = case["contenders"]
    jaxbn, flax = (c.get(k, {}).get("median_s") for k in ("jaxbn", "flax"))
    vs_flax = f"{jaxbn / flax:.2f}x Flax's time" if jaxbn and flax else "Flax n/a"
    floor = case.get("jaxbn_over_floor")
    vs_floor = f"{floor:.2f}x the floor" if floor else "floor n/a"
    ms = f"{jaxbn * 1e3:.3f} ms" if jaxbn else "n/a"
    print(f"  op {case['name']:<34} jaxbn {ms}: {vs_flax}, {vs_floor}")

def groups(name, res):
    """(label, contenders) of each workload in a training benchmark's JSON."""
    if name == "train":
        return [(m["name"], m["contenders"]) for m in res["models"]]
    if name == "cnn":
        return [("cnn", res["results"]["contenders"])]
    return [("fused", res["contenders"])]


def temp(entry):
    return (entry.get("memory") or {}).get("temp_bytes")


for name in ("train", "fused", "cnn"):
    res = load(name)
    if res is None:
        continue
    for label, entries in groups(name, res):
        flax = next((e for k, e in entries.items() if k.startswith("flax")), {})
        for k, e in entries.items():
            if not k.startswith("jaxbn"):
                continue
            speed = e.get("steps_per_s")
            parts = []
            if speed and flax.get("steps_per_s"):
                parts.append(f"{speed / flax['steps_per_s']:.2f}x Flax's steps/s")
            if temp(e) and temp(flax):
                parts.append(f"{temp(e) / temp(flax):.2f}x Flax's temporary memory")
            print(f"  {name:<6} {label:<6} {k:<16} " + (", ".join(parts) or "n/a"))
    for t in res.get("targets", []):
        status = {True: "MET", False: "NOT MET", None: "n/a"}[t.get("met")]
        value = "" if t.get("value") is None else f" ({t['value']:.2f}x)"
        print(f"  {name:<6} {status:<8} {t.get('target')}{value}")
EOF
if ((${#failed[@]})); then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
