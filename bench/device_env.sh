# Sourced by the GPU scripts: the carried wheels (.whl) go to /tmp/site and the source folders are mapped as the
# `coserve` package there (the device image has torch, triton, transformers and peft, not the server's wheels).
mkdir -p /tmp/site/coserve
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
touch /tmp/site/coserve/__init__.py
for pkg in engine kernels operator; do ln -sfn "$PWD/$pkg" "/tmp/site/coserve/$pkg"; done
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
