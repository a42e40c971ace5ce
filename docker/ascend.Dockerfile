# syntax=docker/dockerfile:1
# accel-port on Huawei Ascend (Atlas A2 / 910B by default): a CANN base image, torch_npu and MindSpore.
# Build from the repository root:  docker build -f docker/ascend.Dockerfile -t accel-port:ascend .
# Run with the NPU driver of the host mounted (docker/README.md has the full command).
#
# Versions (docker/README.md has the pairing table and its sources):
# - torch and MindSpore are pinned by constraints.txt, read at build time;
# - torch_npu's release follows torch's version (torch_npu X.Y.Z[.postN] requires torch X.Y.Z), so it is
#   installed as torch-npu==<torch pin>.*;
# - CANN_VERSION is the CANN that both that torch_npu and MindSpore support. tests/test_docker.py checks it
#   against the pairing table and the table against constraints.txt.
ARG CANN_VERSION=9.1.0
ARG CANN_CHIP=910b
ARG PYTHON_VERSION=3.11
FROM quay.io/ascend/cann:${CANN_VERSION}-${CANN_CHIP}-ubuntu22.04-py${PYTHON_VERSION}

ARG EXTRAS=mindspore,npu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
SHELL ["/bin/bash", "-c"]
WORKDIR /opt/accel-port
COPY pyproject.toml constraints.txt README.md ./
COPY accel accel
COPY backends backends
COPY models models
COPY conformance conformance
COPY docker/ascend-entrypoint.sh /usr/local/bin/ascend-entrypoint.sh

# torch_npu refuses to load next to another accelerator's torch, so torch is the CPU wheel (PyTorch's cpu
# index has both x86_64 and aarch64 builds).
RUN TORCH_VERSION="$(sed -n 's/^torch==//p' constraints.txt)" \
 && python3 -m pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}" \
 && python3 -m pip install -c constraints.txt ".[${EXTRAS}]" "torch-npu==${TORCH_VERSION}.*"

# smoke test: the CLI runs with CANN's environment; no NPU is visible while building, so torch:npu and
# mindspore:ascend list as unavailable here, with the reason
RUN /usr/local/bin/ascend-entrypoint.sh accel targets

ENTRYPOINT ["/usr/local/bin/ascend-entrypoint.sh", "accel"]
CMD ["targets"]
