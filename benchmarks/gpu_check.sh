#!/usr/bin/env bash
# The GPU checks, as one prepared script for a lent H100/H200: a CUDA smoke search through
# the whole runner for each algorithm, then benchmarks/search_step.py at the DARTS paper size
# (B=64, C=16, 8 cells, 3x32x32), each algorithm beside its own DARTS baseline in the same
# process (about 4 min on an H200; run it with timeout_s=600). Arguments pick sections (default
# all): darts lease dsrna layout smoke. Needs pydantic where it runs (wheels in .whl/, installed to
# /tmp/site). Output in $OUT (more than 8 files: pack them into one, the device returns 8).
# The wheels, fetched once on the dev machine (.whl/ is in .git/info/exclude; carry it):
#   python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .whl pydantic==2.13.4 pydantic_core==2.46.4 annotated_types typing_inspection
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
step() {  # name, timeout, search_step args...
  local name=$1 t=$2; shift 2
  timeout "$t" python3 benchmarks/search_step.py "$@" > "$OUT/step_$name.json" 2> "$OUT/step_$name.err"
  echo "== $name rc=$?"
  python3 -c "import json; d=json.load(open('$OUT/step_$name.json')); [print(r['algorithm'], r.get('error') or '%s ms/step %s img/s %s GiB x%s %s kernels' % (r['ms_per_step'], r['images_per_s'], r.get('peak_mem_gib'), r['ratio_to_darts_first_order'], r.get('kernels_per_step'))) for r in d['results']]" 2>/dev/null || tail -3 "$OUT/step_$name.err"
}
want() { [ -z "$SECTIONS" ] || [[ " $SECTIONS " == *" $1 "* ]]; }
SECTIONS="$*"
if want darts; then
step darts 140 --algorithm darts darts2 --steps 10 --warmup 3 --profile --cuda-graph
grep -E "Name|---|^ *[a-z_].*%" "$OUT/step_darts.err" | head -22
fi
want lease && step lease 120 --algorithm lease --steps 5 --warmup 2 --cuda-graph
if want dsrna; then
step dsrna_jac 120 --algorithm dsrna-jacobian-fd dsrna-jacobian-fd-quarter dsrna-jacobian --projections 1 --steps 3 --warmup 1
# the route to the 1.5x goal: launches gone (CUDA graph), R on B/4 (algorithm.robust_batch)
step dsrna_graph 60 --algorithm dsrna-jacobian-fd-quarter --projections 1 --steps 3 --warmup 2 --cuda-graph
# exact norms by finite differences (launch/configs/cifar10_dsrna.yaml): 12 x 64 images in one pass
step dsrna_exact 60 --algorithm dsrna-jacobian-fd --projections 0 --steps 3 --warmup 1
step dsrna_cb 40 --algorithm dsrna-certified --bound ibp --steps 3 --warmup 1
fi
if want layout; then  # cuDNN's NCHW<->NHWC transposes were 40 % of a DARTS step's CUDA time (H200)
step nchw 60 --algorithm darts dsrna-jacobian-fd-quarter --projections 1 --steps 10 --warmup 3 --cuda-graph
step nhwc 150 --algorithm darts dsrna-jacobian-fd-quarter --projections 1 --steps 10 --warmup 3 --cuda-graph --channels-last --profile
grep -E "Name|^ *[a-z_].*%" "$OUT/step_nhwc.err" | head -8
step nhwc_bf16 60 --algorithm darts --steps 10 --warmup 3 --cuda-graph --channels-last --bf16
fi
want smoke || exit 0
timeout 150 python3 - <<'PY' 2>&1 | grep -v Warning | tee "$OUT/smoke.txt"
import tempfile, time
from distsearch.config_file import parse_config
from distsearch.runner import run_search
from distsearch.storage import Store
raw = {"epochs": 3, "device": "cuda", "data": {"name": "synthetic", "batch_size": 32,
       "synthetic": {"n": 384, "channels": 3, "image_size": 16, "num_classes": 4}},
       "space": {"C": 8, "layers": 3, "nodes": 3}, "monitor": {"progress": False, "tensorboard": False}}
goal = {"name": "dsrna", "variant": "jacobian", "projections": 1, "jacobian_fd_step": 1.0, "robust_batch": 8}
fast = {"precision": "bf16", "channels_last": True}  # the fastest DARTS step measured (README, Benchmarks)
runs = [({"name": "darts"}, False, {}), ({"name": "darts"}, True, {}), ({"name": "darts"}, True, fast),
        ({"name": "darts", "order": "second"}, False, {}), ({"name": "darts", "order": "second"}, True, {}),
        (goal, False, {}), (goal, True, {}), ({"name": "lease"}, False, {}), ({"name": "lease"}, True, {}),
        ({"name": "dsrna", "variant": "combined", "projections": 1, "jacobian_fd_step": 1.0}, False, {}),
        ({"name": "dsrna", "variant": "jacobian", "projections": 1}, False, {})]  # double backward: double_backward.py
for algo, graph, extra in runs:  # graphed vs eager: same data and seed, so close val/loss (not bitwise); 3 captures
    d, tag = tempfile.mkdtemp(), ("smoke", algo, "graph" if graph else "eager", extra or "")
    cfg = parse_config({**raw, **extra, "algorithm": algo, "cuda_graph": graph, "storage": {"uri": d}})
    t = time.time()
    try:
        r = run_search(cfg, Store(d))
    except Exception as e:  # report and go on with the next run
        print(*tag, "FAILED", type(e).__name__, str(e)[:300])
        continue
    m = r.metrics
    print(*tag, f"{time.time() - t:.1f}s", "val/loss", round(m["val/loss"], 4), "val/acc", round(m["val/acc"], 3),
          "genotype", r.genotype.normal[:2])
PY
