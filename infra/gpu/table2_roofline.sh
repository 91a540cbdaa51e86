#!/usr/bin/env bash
# Issue 22 on one GPU, as one short script (run from the repository root; results under $OUT):
#   1. the captured fast path equals the eager one (tests/test_static_decode.py, tiny models, CUDA graphs);
#   2. Table 2 with the roofline, eager and fast paths, for LLaVA-1.5-7B and LLaVA-NeXT-7B (random weights, bf16).
# The transformers wheel the CPU tests ran with may travel in .whl/ (carry it); it is used when it imports there,
# else the device's own transformers (>= 5) is.
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
python3 -c 'import torch, transformers; print("device:", torch.__version__, transformers.__version__, torch.cuda.get_device_name())'
if ls .whl/transformers-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/transformers-*.whl \
    && PYTHONPATH=/tmp/site:$PWD python3 -c 'import transformers.models.llava_next.modeling_llava_next' \
    && export PYTHONPATH=/tmp/site:$PWD
fi
python3 -c 'import transformers; print("using transformers", transformers.__version__)'
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_static_decode.py -k "captured or token_for_token" \
  2>&1 | tee "$OUT/gpu_equality.txt"
for arch in llava-1.5-7b llava-next-7b; do
  timeout ${BENCH_TIMEOUT:-170} python3 - "$arch" "$OUT" "${REPEATS:-10}" <<'PY' 2>&1 | grep -v "^\s*$" | tail -60
import argparse, json, sys
from pathlib import Path

from pipeline.commands.bench_efficiency import markdown, register

arch, out, repeats = sys.argv[1:4]
# recorded in the report as the equivalent `metacompress bench efficiency ...` command
sys.argv = ["metacompress", "bench", "efficiency", "--arch", arch, "--device", "cuda", "--repeats", repeats,
            "--warmup", "2", "--methods", "full,sample,metacompress,fastv", "--rates", "0.7,0.9", "--paths",
            "eager,fast", "--roofline", "--out", f"{out}/table2_{arch}.json"]
parser = argparse.ArgumentParser(prog="metacompress bench")
register(parser.add_subparsers(dest="bench", required=True))
args = parser.parse_args(sys.argv[2:])
args.func(args)
report = json.loads(Path(args.out).read_text())  # the markdown of the same run
Path(args.out).with_suffix(".md").write_text(markdown(report))
PY
done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv 2>/dev/null
