#!/usr/bin/env bash
# The GPU checks, as one prepared script for a lent H100/H200 (see README "Benchmarks"):
# a CUDA smoke search through the whole runner, then search_step.py for every algorithm at
# the DARTS paper size (B=64, C=16, 8 cells, 3x32x32), each beside its own DARTS baseline.
# Needs pydantic where it runs (wheels in .whl/, installed to /tmp/site). Results in $OUT.
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout 120 python3 - <<'PY' 2>&1 | tee "$OUT/smoke.txt"
import tempfile, time
from distsearch.config import parse_config
from distsearch.runner import run_search
from distsearch.storage import Store
raw = {"epochs": 2, "device": "cuda", "data": {"name": "synthetic", "batch_size": 32,
       "synthetic": {"n": 512, "channels": 3, "image_size": 16, "num_classes": 4}},
       "space": {"C": 8, "layers": 3, "nodes": 3}, "monitor": {"progress": False, "tensorboard": False}}
for algo in ({"name": "darts", "order": "second"}, {"name": "lease"}, {"name": "dsrna", "variant": "combined"}):
    d = tempfile.mkdtemp()
    cfg = parse_config({**raw, "algorithm": algo, "storage": {"uri": d}})
    t = time.time()
    r = run_search(cfg, Store(d))
    print("smoke", algo, f"{time.time() - t:.1f}s", "val/acc", round(r.metrics["val/acc"], 3), r.genotype.normal[:2])
PY
for algo in darts2 lease dsrna-jacobian dsrna-certified; do
  timeout 150 python3 benchmarks/search_step.py --algorithm $algo --steps 10 --warmup 3 > "$OUT/step_$algo.json" 2> "$OUT/step_$algo.err"
  echo "$algo rc=$?"; python3 -c "import json,sys; d=json.load(open('$OUT/step_$algo.json')); [print(r['algorithm'], r['ms_per_step'], 'ms', r['images_per_s'], 'img/s', r.get('peak_mem_gib'), 'GiB', r['ratio_to_darts_first_order']) for r in d['results']]" || tail -3 "$OUT/step_$algo.err"
done
timeout 100 python3 benchmarks/search_step.py --algorithm darts --bf16 --channels-last > "$OUT/step_darts_bf16_cl.json" 2>&1
python3 -c "import json; d=json.load(open('$OUT/step_darts_bf16_cl.json')); [print('bf16+channels_last', r['algorithm'], r['ms_per_step'], 'ms', r.get('peak_mem_gib'), 'GiB') for r in d['results']]"
