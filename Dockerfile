# GPU image for reproducible runs on single nodes and multi-node clusters.
#
#   docker build -t zh-seq2seq-pretrain .
#   docker run --gpus all --ipc=host --rm -v "$PWD/work:/workspace/project/work" zh-seq2seq-pretrain \
#       bash bin/run_pipeline.sh
#
# torch is the CUDA build of the version setup.cfg pins; DeepSpeed's FusedAdam is compiled
# at build time (no JIT on the cluster); apex is built from source with its CUDA
# extensions so the trainer can use FusedLayerNorm. TORCH_CUDA_ARCH_LIST covers A100 (8.0)
# and H100 (9.0).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu128
ARG DEEPSPEED_VERSION=0.19.8
ARG APEX_COMMIT=705cba91fc26413d484f5ce2983427d840199a97
ARG MAX_JOBS=8

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_CUDA_ARCH_LIST="8.0;9.0" \
    MAX_JOBS=${MAX_JOBS} \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Build tools for the CUDA extensions; pdsh and ssh for the deepspeed multi-node launcher;
# libaio for DeepSpeed's async I/O op. Versions come from the pinned base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-dev python3-venv git build-essential ninja-build \
        pdsh openssh-client openssh-server libaio-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "${VIRTUAL_ENV}"

RUN pip install --upgrade "pip==25.3" "setuptools==80.9.0" "wheel==0.45.1" "packaging==25.0" "ninja==1.13.0" \
    && pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"

# FusedAdam compiled now, against the torch above (hence no build isolation).
RUN DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 pip install --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}"

# apex with its C++ and CUDA extensions (FusedLayerNorm), pinned to one commit.
WORKDIR /opt
RUN git clone https://github.com/NVIDIA/apex.git \
    && git -C apex checkout "${APEX_COMMIT}" \
    && pip install -v --no-build-isolation \
        --config-settings "--build-option=--cpp_ext" --config-settings "--build-option=--cuda_ext" ./apex \
    && rm -rf apex

WORKDIR /workspace/project
COPY setup.cfg pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY data_tools ./data_tools
COPY ds_configs ./ds_configs
COPY bin ./bin
COPY tests ./tests
COPY bench ./bench
RUN pip install -e ".[data,train,test]" \
    && python -c "import apex.normalization, deepspeed, torch; print(torch.__version__, deepspeed.__version__)" \
    && ds_report

# The deepspeed launcher reaches other nodes over ssh (pdsh); mount keys at run time.
RUN mkdir -p /run/sshd /root/.ssh && chmod 700 /root/.ssh
ENV DS_ACCELERATOR=cuda
CMD ["bash"]
