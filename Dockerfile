# GPU image of the voice assistant: the `gpu` preset (faster-whisper, llama.cpp and Sesame CSM on CUDA).
#   docker build -t voice-assistant .
#   docker run --gpus all -p 127.0.0.1:8000:8000 -v va-models:/models voice-assistant   (this computer only;
#   phones on the network: see the README, `serve --lan` with --network host)
# The server listens on every interface of the container (VA_HOST=0.0.0.0), so it pairs: open the
# "on this computer" link from `docker logs` (http://localhost:8000/?token=...) once per browser.
# CUDA 13.0 matches torch 2.13's PyPI wheels (the nvidia-*/cu13 packages in uv.lock); the host needs an
# NVIDIA driver >= 580. The venv is built in the CUDA devel image (llama-cpp-python compiles llama.cpp
# with nvcc) and copied into the smaller runtime image. Every Python package comes from uv.lock, and
# Python is .python-version's (3.11), uv's build of CPython, in /opt/python in both stages.

ARG CUDA_VERSION=13.0.1
ARG UBUNTU_VERSION=24.04
ARG UV_VERSION=0.13.9

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# ---------------------------------------------------------------- build: the venv, with CUDA llama.cpp
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS build

# Distribution packages follow the base image's release; pinning them would break on every update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv

# Python: the project's own version (.python-version; Ubuntu 24.04 has only 3.12), uv's build of CPython,
# which has its headers (Triton compiles its launchers against them at run time), in a fixed folder that
# the runtime stage copies as it is (the venv links to it). Only this explicit install downloads one.
ENV UV_PYTHON=3.11 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_MANAGED_PYTHON=1 \
    UV_PYTHON_DOWNLOADS=manual \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
RUN uv python install --no-bin "${UV_PYTHON}"

# pyproject.toml's extra-build-variables gives llama-cpp-python CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF", and uv
# lets that win over this environment's CMAKE_ARGS: so the CUDA switch goes through scikit-build-core's
# own SKBUILD_CMAKE_DEFINE, which is added to it. GGML_NATIVE=OFF: the build machine's CPU is not the
# user's (nor, without --gpus at build time, its GPU).
ENV CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=OFF" \
    SKBUILD_CMAKE_DEFINE="GGML_CUDA=on;GGML_NATIVE=OFF"

# The GPUs llama.cpp gets machine code for (CMake's CUDA_ARCHITECTURES): Turing 75, Ampere 80 and 86,
# Ada 89, Hopper 90, Blackwell 100 and 120 (which llama.cpp builds as 120a, for its FP4 tensor cores);
# and Hopper's PTX, which the driver compiles once for any newer GPU, into the volume's JIT cache.
# Each architecture adds about as much compile time as the first: build for yours alone with e.g.
# `docker build --build-arg CUDA_ARCHS=90-real .` (H100/H200), 89-real (RTX 40xx), 86-real (RTX 30xx).
# The list has semicolons, which SKBUILD_CMAKE_DEFINE would split: it goes as a build setting of its own.
ARG CUDA_ARCHS="75-real;80-real;86-real;89-real;90-real;100-real;120-real;90-virtual"

WORKDIR /app
# Dependencies first (the slow layer: torch, the llama.cpp build), from the two files that name them
# and nothing else, so that editing the README or the app reuses it; then the project on top. uv needs
# no README.md to install the dependencies alone (hatchling reads it only to build the project below).
COPY pyproject.toml uv.lock ./
RUN uv sync --locked --no-dev --no-install-project \
        --config-settings-package "llama-cpp-python:cmake.define.CMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS}"
COPY README.md ./
COPY app ./app
COPY static ./static
COPY templates ./templates
RUN uv sync --locked --no-dev \
        --config-settings-package "llama-cpp-python:cmake.define.CMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS}"
# A build that silently fell back to the CPU would only show at run time, as a slow LLM: stop here.
RUN [ -n "$(find .venv -name 'libggml-cuda.so*')" ] \
    || { echo "llama-cpp-python was built without CUDA" >&2; exit 1; }

# ---------------------------------------------------------------- runtime
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION}

# torch and llama.cpp use CUDA 13 (torch from its wheels, llama.cpp from this image). faster-whisper's
# CTranslate2 wheels are built for CUDA 12 and load libcublas.so.12 (and no cuDNN): that comes from
# the nvidia-cublas-cu12 wheel in uv.lock, which app/engines/asr.py loads; the same >= 580 driver runs both.
# libgomp1: OpenMP for native code that links the system's (llama.cpp is built without it; CTranslate2 and
# torch bring their own). gcc and libc6-dev (which gcc only recommends): the compiled CSM step runs
# Triton kernels, and Triton builds each kernel's launcher, a Python C extension, with gcc at first use
# (its headers come with /opt/python); without them `csm.compile=auto` would fall back to the eager
# step. Distribution packages are not pinned (see above).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev libgomp1 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A user of its own (numeric below, so the host can resolve it); /models, the Hugging Face cache and
# a volume, is the one place it writes to.
RUN groupadd --gid 10001 assistant \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin assistant \
    && mkdir /models \
    && chown 10001:10001 /models

COPY --from=build /opt/python /opt/python
WORKDIR /app
COPY --from=build /app /app

# The runtime stage can compile: Triton's own build function (the one that builds its launchers: the C
# compiler it finds, the venv's Python headers, gcc -shared) builds and imports a Python C extension
# here, or the build stops. (The launchers also link the driver's libcuda, which exists only under --gpus.)
RUN TRITON_CACHE_DIR=/tmp/triton-probe /app/.venv/bin/python -c "from triton.runtime.build import compile_module_from_src; \
compile_module_from_src('#include <Python.h>\nstatic struct PyModuleDef m = {PyModuleDef_HEAD_INIT, \"probe\"};\n\
PyMODINIT_FUNC PyInit_probe(void) { return PyModule_Create(&m); }\n', 'probe')" \
    && rm -rf /tmp/triton-probe

# A GPU outside CUDA_ARCHS runs llama.cpp from PTX, which the driver compiles at the first start: its
# cache goes in the volume too, at the largest size the driver allows, so that happens once, not on
# every container start. XDG_CACHE_HOME puts the pairing token, the paired devices and a --lan
# certificate (voice-assistant/tls, 0700) in the volume as well: a re-created container (a new image)
# keeps every device paired.
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/models \
    XDG_CACHE_HOME=/models/cache \
    CUDA_CACHE_PATH=/models/cuda-jit-cache \
    CUDA_CACHE_MAXSIZE=4294967296 \
    VA_HOST=0.0.0.0 \
    VA_PORT=8000

VOLUME ["/models"]
EXPOSE 8000
USER 10001:10001

# Healthy = every model loaded and warmed up (/health answers 200; 503 while loading). A first launch
# downloads about 6 GB of models, hence the long start period. It asks from inside the container
# (loopback), which needs no pairing.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('VA_PORT', '8000'), timeout=4)"]

CMD ["voice-assistant", "serve"]
