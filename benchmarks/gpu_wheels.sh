#!/usr/bin/env bash
# Wheels for the GPU machine (run here, where pip reaches the registry): every package of this
# virtualenv that the device image lacks, at this virtualenv's versions, for its Python 3.12 on
# x86-64, into .whl/ (git-ignored through .git/info/exclude). Carry `.whl` to the device; see
# benchmarks/gpu_check.py for the command there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
mkdir -p .whl
# The device image's packages, as /work/.library/device/KINDS.md listed them on 2026-11-17.
DEVICE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cycler cython einops
filelock flatbuffers fonttools frozenlist fsspec grpcio h11 h5py hf-xet httpcore httpx huggingface-hub
humanize hypothesis idna iniconfig jinja2 joblib kiwisolver lxml markdown markdown-it-py markupsafe
matplotlib mdurl ml-dtypes mpmath msgpack multidict networkx numpy packaging pandas pathspec pillow pip
pluggy portalocker propcache protobuf psutil pyarrow pygments pyparsing python-dateutil pyyaml regex
requests rich sacrebleu safetensors scikit-learn scipy setuptools shellingham six sortedcontainers sympy
tabulate tensorboard tensorboard-data-server threadpoolctl tiktoken tokenizers tqdm transformers triton
typer typing-extensions urllib3 uvloop werkzeug wheel xxhash yarl zipp"
# Not needed by the GPU check: torch (the device has its own), this project (it travels as src/),
# the test-only browser driver and the data stage's libraries.
SKIP="torch zagreus pytest selenium trio trio-websocket outcome wsproto websocket-client pysocks
datatrove lingua-language-detector loguru"
norm() { tr 'A-Z_.' 'a-z--'; }
have=" $(echo $DEVICE $SKIP | norm) "
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64"
.venv/bin/pip list --format=freeze | while IFS='=' read -r name _ version; do
  case "$have" in *" $(echo "$name" | norm) "*) continue ;; esac
  if ! .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        $platforms -d .whl "$name==$version" 2>/dev/null; then
    # A package published only as a source archive: build its (pure-Python) wheel here.
    .venv/bin/pip wheel -q --no-deps -w .whl "$name==$version"
  fi
done
du -sh .whl
