# syntax=docker/dockerfile:1
# accel-port on NVIDIA GPUs: a CUDA runtime image and the CUDA build of the pinned torch.
# Build from the repository root:  docker build -f docker/cuda.Dockerfile -t accel-port:cuda .
# Run:                             docker run --gpus all --rm accel-port:cuda targets
#
# Versions: Python packages are pinned by constraints.txt, read at build time. TORCH_CUDA names the
# PyTorch wheel index (cu130: CUDA 13.0) and must match the base image's CUDA_VERSION; the host driver
# must support that CUDA. tests/test_docker.py checks these defaults against each other and against
# constraints.txt / pyproject.toml.
ARG CUDA_VERSION=13.0.0
ARG UBUNTU_VERSION=22.04
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION}

ARG PYTHON_VERSION=3.11
ARG TORCH_CUDA=cu130
ARG EXTRAS=onnx
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-venv" \
 && rm -rf /var/lib/apt/lists/* \
 && "python${PYTHON_VERSION}" -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/accel-port
COPY pyproject.toml constraints.txt README.md ./
COPY accel accel
COPY backends backends
COPY models models
COPY conformance conformance

# The CUDA wheel of the pinned torch version comes from PyTorch's index for TORCH_CUDA; pip then keeps it,
# since torch==X matches X+cu130.
RUN TORCH_VERSION="$(sed -n 's/^torch==//p' constraints.txt)" \
 && pip install --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" "torch==${TORCH_VERSION}" \
 && pip install -c constraints.txt ".[${EXTRAS}]"

# smoke test: the CLI runs (no GPU is visible while building, so torch:cuda lists as unavailable here)
RUN accel targets

ENTRYPOINT ["accel"]
CMD ["targets"]
