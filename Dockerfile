# One image for the operator and the engine pods. Build and push:
#   docker build -t ghcr.io/coserve/coserve:0.1.0 . && docker push ghcr.io/coserve/coserve:0.1.0
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/coserve
ENV PATH=/opt/coserve/bin:$PATH
COPY pyproject.toml README.md /src/
COPY engine /src/engine
COPY kernels /src/kernels
COPY operator /src/operator
RUN pip install --no-cache-dir "/src[operator]"
USER 65532:65532
ENTRYPOINT ["coserve"]
