# GPU image for reproducible runs on single nodes and multi-node clusters (docs/gpu-and-clusters.md: "Docker").
#
#   docker build -t zh-seq2seq-pretrain .
#   docker run --gpus all --ipc host --rm -v "$PWD/work:/workspace/project/work" zh-seq2seq-pretrain \
#       bash bin/run_pipeline.sh
#
# One CUDA line. The PyPI torch 2.13.0 wheel for Linux x86_64 is the CUDA 13.0 build (version
# 2.13.0+cu130, torch.version.cuda == "13.0"; it depends on cuda-toolkit 13.0.3 and nvidia-*-cu13),
# so torch comes from the cu130 index and the base image's nvcc is 13.0: apex and DeepSpeed 0.19.8
# want nvcc's major.minor to equal torch.version.cuda (DeepSpeed forgives a minor mismatch only for
# CUDA 10-12), torch's cpp_extension the same major. The torch step below stops the build if they differ. Hosts need an NVIDIA driver >= 580 (CUDA 13.x).
# Extensions are compiled for A100 (8.0) and H100 (9.0), with 9.0 PTX for newer GPUs.
ARG CUDA_IMAGE=nvidia/cuda:13.0.3-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu130
ARG DEEPSPEED_VERSION=0.19.8
# NVIDIA/apex master of 2026-07-08 (#2017): no torch._six, no THC headers, FusedLayerNorm has bf16
# kernels. --build-arg WITH_APEX=0 leaves apex out (the trainer then uses torch.nn.LayerNorm).
ARG APEX_COMMIT=6424da3b4faa6c8f062da4a48c424fff3f02d42d
ARG WITH_APEX=1
ARG MAX_JOBS=8
# sshd for the deepspeed launcher (pdsh over ssh). Not 22, so that it does not clash with the
# host's own sshd under --network host.
ARG SSH_PORT=2222

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" \
    MAX_JOBS=${MAX_JOBS} \
    DS_ACCELERATOR=cuda \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Build tools for the CUDA extensions; libaio for DeepSpeed's async I/O op; pdsh and ssh for the
# deepspeed multi-node launcher; rdma-core, libibverbs and its providers so NCCL can use
# InfiniBand/RoCE (ibverbs-utils: ibv_devinfo). Versions come from the pinned base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-dev python3-venv git build-essential ca-certificates libaio-dev \
        pdsh openssh-client openssh-server \
        rdma-core libibverbs1 ibverbs-providers ibverbs-utils \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "${VIRTUAL_ENV}"

# The versions CI tests (bin/constraints.txt: transformers 5.x, deepspeed, numpy, ...): every pip
# install below takes them; TORCH_VERSION and DEEPSPEED_VERSION must equal its lines (tests/test_dockerfile.py).
COPY bin/constraints.txt /opt/constraints.txt

# torch's CUDA build must be the one nvcc targets: checked here, before anything is compiled.
RUN pip install --upgrade "pip==25.3" "setuptools==80.9.0" "wheel==0.45.1" "packaging==25.0" "ninja==1.13.0" \
    && pip install -c /opt/constraints.txt "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" \
    && torch_cuda="$(python -c 'import torch; print(torch.version.cuda)')" \
    && nvcc_cuda="$(nvcc --version | sed -n 's/.*release \([0-9]*\.[0-9]*\),.*/\1/p')" \
    && echo "torch ${TORCH_VERSION}: CUDA ${torch_cuda}; nvcc: CUDA ${nvcc_cuda}" \
    && test "cu${torch_cuda/./}" = "${TORCH_CUDA}" \
    && test "${torch_cuda}" = "${nvcc_cuda}"

# DeepSpeed's FusedAdam compiled now against the torch above (hence no build isolation; --no-binary
# so it is always built from source). docker build sees no GPU, so DeepSpeed would pick its CPU
# accelerator and build the CPU variant: DS_ACCELERATOR=cuda selects the CUDA one. setup.py only
# warns when an op cannot be built, so check that fused_adam was compiled for the cuda accelerator
# and that it loads (no GPU needed for that). CPU Adam (ZeRO-Offload) is left to DeepSpeed's JIT
# build on the node that uses it: DeepSpeed compiles it with -march=native, which would tie the
# image to the build machine's CPU.
RUN DS_ACCELERATOR=cuda DS_BUILD_FUSED_ADAM=1 \
        pip install -c /opt/constraints.txt --no-build-isolation --no-binary deepspeed "deepspeed==${DEEPSPEED_VERSION}" \
    && DS_ACCELERATOR=cuda python -c "import importlib; \
from deepspeed.git_version_info import accelerator_name, installed_ops; \
assert accelerator_name == 'cuda', f'DeepSpeed was built for the {accelerator_name} accelerator'; \
assert installed_ops.get('fused_adam'), 'DeepSpeed did not compile fused_adam'; \
importlib.import_module('deepspeed.ops.adam.fused_adam_op')"

# apex with its C++ and CUDA extensions (FusedLayerNorm), pinned to one commit and built with the
# flags of that commit's README (APEX_CPP_EXT=1 APEX_CUDA_EXT=1, no build isolation).
RUN if [ "${WITH_APEX}" = 1 ]; then \
        git init -q /tmp/apex \
        && git -C /tmp/apex fetch -q --depth 1 https://github.com/NVIDIA/apex.git "${APEX_COMMIT}" \
        && git -C /tmp/apex checkout -q FETCH_HEAD \
        && APEX_CPP_EXT=1 APEX_CUDA_EXT=1 pip install -v --no-build-isolation /tmp/apex \
        && rm -rf /tmp/apex \
        && python -c "import importlib, torch; \
[importlib.import_module(m) for m in ('apex_C', 'amp_C', 'fused_layer_norm_cuda')]; \
from apex.normalization import FusedLayerNorm"; \
    fi

WORKDIR /workspace/project
COPY setup.cfg pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY data_tools ./data_tools
COPY ds_configs ./ds_configs
COPY bin ./bin
COPY tests ./tests
COPY bench ./bench
# All of setup.cfg's extras at the tested versions; then ds_report must still list fused_adam as installed ([YES]).
RUN pip install -c /opt/constraints.txt -e ".[data,train,test,bench,plot]" \
    && python -c "import deepspeed, torch; print(torch.__version__, torch.version.cuda, deepspeed.__version__)" \
    && ds_report | sed -e 's/\x1b\[[0-9;]*m//g' > /tmp/ds_report.txt \
    && cat /tmp/ds_report.txt \
    && grep -E '^fused_adam \.+ \[YES\]' /tmp/ds_report.txt \
    && rm /tmp/ds_report.txt

# sshd on SSH_PORT for the deepspeed launcher: root logs in with a key only; SetEnv gives the
# launcher's remote commands the image's PATH and DS_ACCELERATOR. ssh in the container uses the
# same port and accepts a node's host key on first contact. Host keys are made when a container
# starts (start-sshd), not baked into the image; the ones made here only let `sshd -t` check the config.
# start-sshd [command...]: copies the keys mounted at /ssh-keys into /root/.ssh (owned by root, mode
# 600, as sshd requires), starts sshd, then runs the command (default: sleep, for worker nodes).
# hadolint ignore=SC2016
RUN usermod -p '*' root \
    && printf '%s\n' "Port ${SSH_PORT}" 'PermitRootLogin prohibit-password' 'PubkeyAuthentication yes' \
        'PasswordAuthentication no' 'KbdInteractiveAuthentication no' 'UsePAM no' \
        "SetEnv PATH=${PATH} DS_ACCELERATOR=${DS_ACCELERATOR}" \
        > /etc/ssh/sshd_config.d/zh-seq2seq.conf \
    && printf '%s\n' 'Host *' "    Port ${SSH_PORT}" '    StrictHostKeyChecking accept-new' \
        > /etc/ssh/ssh_config.d/zh-seq2seq.conf \
    && printf '%s\n' '#!/bin/bash' 'set -euo pipefail' \
        'if [ -d /ssh-keys ]; then' \
        '  install -d -m 700 /root/.ssh' \
        '  for f in /ssh-keys/*; do install -m 600 "$f" /root/.ssh/; done' \
        'fi' \
        'install -d -m 755 /run/sshd' \
        'ssh-keygen -A' \
        '/usr/sbin/sshd' \
        'if [ "$#" -eq 0 ]; then set -- sleep infinity; fi' \
        'exec "$@"' \
        > /usr/local/bin/start-sshd \
    && chmod 755 /usr/local/bin/start-sshd \
    && install -d -m 700 /root/.ssh \
    && install -d -m 755 /run/sshd \
    && ssh-keygen -A \
    && /usr/sbin/sshd -t \
    && rm -f /etc/ssh/ssh_host_*
EXPOSE ${SSH_PORT}

CMD ["bash"]
