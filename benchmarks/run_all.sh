#!/usr/bin/env bash
# One command for the speed table: builds what the benchmark compares against, then runs it.
#   bash benchmarks/run_all.sh [bench_generate.py options]
# Needs network access the first time (pip), a C/C++ compiler and cmake (llama.cpp is compiled from
# the sources vendored in llama-cpp-python's sdist: --no-binary). Everything it builds lives in
# benchmarks/work/ (git-ignored) and is reused by later runs:
#   benchmarks/work/torch   torch (CPU) + transformers + gguf, the `fixtures` extra's pins
#   benchmarks/work/llama   llama-cpp-python built from source
# minilm itself runs from the Python that runs this script (install minilm there first).
set -euo pipefail
cd "$(dirname "$0")/.."
work=benchmarks/work
mkdir -p "$work"
if [ ! -x "$work/torch/bin/python" ]; then
  python3 -m venv "$work/torch"
  "$work/torch/bin/pip" install -q --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    || "$work/torch/bin/pip" install -q torch==2.13.0
  "$work/torch/bin/pip" install -q transformers==5.23.0 accelerate gguf sentencepiece protobuf
fi
if [ ! -x "$work/llama/bin/python" ] || ! "$work/llama/bin/python" -c "import llama_cpp" 2>/dev/null; then
  python3 -m venv "$work/llama"
  CMAKE_ARGS="-DGGML_NATIVE=ON" "$work/llama/bin/pip" install -q --no-binary llama-cpp-python llama-cpp-python
fi
python benchmarks/bench_generate.py --torch-python "$work/torch/bin/python" --llama-python "$work/llama/bin/python" "$@"
