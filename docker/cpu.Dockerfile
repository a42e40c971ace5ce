# syntax=docker/dockerfile:1
# accel-port on CPU with every extra that installs there (MindSpore, JAX/XLA, ONNX Runtime, TVM).
# Build from the repository root:  docker build -f docker/cpu.Dockerfile -t accel-port:cpu .
#
# Versions: every Python package is pinned by constraints.txt, read at build time, so the image cannot
# drift from the repository. PYTHON_VERSION is the Python that constraints.txt was resolved for
# (tests/test_docker.py checks it against constraints.txt and pyproject.toml).
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG EXTRAS=all
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /opt/accel-port
COPY pyproject.toml constraints.txt README.md ./
COPY accel accel
COPY backends backends
COPY models models
COPY conformance conformance

# PyPI's Linux torch wheel is the CUDA build: the CPU wheel of the pinned version comes from PyTorch's own
# index; pip then keeps it, since torch==X matches X+cpu.
RUN TORCH_VERSION="$(sed -n 's/^torch==//p' constraints.txt)" \
 && pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
 && pip install -c constraints.txt ".[${EXTRAS}]"

# smoke test: the CLI runs and lists the targets this image can use
RUN accel targets

ENTRYPOINT ["accel"]
CMD ["targets"]
