# GPU image of the voice assistant: `docker build -t voice-assistant .` then
# `docker run --gpus all -p 8000:8000 -v va-models:/models voice-assistant`
# (issue 6 finishes this image: CUDA llama.cpp build, non-root user, healthcheck, hadolint.)
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    HF_HOME=/models \
    CMAKE_ARGS="-DGGML_NATIVE=OFF"

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-dev build-essential cmake curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=ghcr.io/astral-sh/uv:0.9 /uv /usr/local/bin/uv

WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project --python python3.12
COPY app ./app
COPY static ./static
COPY templates ./templates
RUN uv sync --frozen --no-dev --python python3.12

VOLUME ["/models"]
EXPOSE 8000
CMD ["uv", "run", "--frozen", "--no-dev", "voice-assistant", "serve", "--host", "0.0.0.0", "--port", "8000"]
