# The project image, the one every Kubeflow task runs (lightweight components: `sh -c ... python3 -m
# kfp.dsl.executor_main`, so python3 and kfp are on PATH; no ENTRYPOINT), and the MLflow server's image.
#
#   docker build --build-arg VARIANT=cuda --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t $REGISTRY/collectionlora:$TAG .
#   docker build --build-arg VARIANT=cpu  ...   # CPU-only torch: kind/minikube, CPU nodes
#   docker build --target mlflow-server -t $REGISTRY/collectionlora-mlflow:3.17.2 .
#
# VARIANT picks the PyTorch wheel index: cuda = TORCH_CUDA (cu130, the CUDA build PyPI also ships for
# torch 2.13.0; NVIDIA driver >= 580, or build with TORCH_CUDA=cu126 for older drivers), cpu = the CPU
# wheels. The CUDA runtime comes inside the wheels (nvidia-* packages); the node's driver is mounted by
# the NVIDIA container toolkit, so both variants share one slim Python base.

FROM python:3.11-slim-bookworm AS python-base
# Nothing reaches the network at run time: no hub downloads, no telemetry, no EC2 metadata probing.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    DVC_NO_ANALYTICS=1 \
    AWS_EC2_METADATA_DISABLED=true
# A fixed non-root user: the manifests' securityContext (runAsUser 1000) and volume ownership rely on it.
RUN groupadd --gid 1000 app \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/app --shell /usr/sbin/nologin app
WORKDIR /app

# The tracking server: the same mlflow and boto3 as the clients (constrained by the lock), plus what
# the lock leaves out because only a server needs it: the Postgres driver and Flask-WTF (basic-auth).
FROM python-base AS mlflow-server
COPY requirements.lock /tmp/requirements.lock
RUN pip install --no-cache-dir --constraint /tmp/requirements.lock \
        mlflow==3.17.2 boto3==1.43.117 psycopg2-binary==2.9.13 Flask-WTF==1.3.0 WTForms==3.3.2 \
    && python -c "import psycopg2, flask_wtf, boto3, mlflow.server.auth" \
    && rm /tmp/requirements.lock
USER 1000:1000
EXPOSE 5000

# The project: torch first (the heaviest layer, rebuilt only when VARIANT or the torch version
# changes), then the lock without torch, then the package itself without dependencies.
FROM python-base AS project
ARG VARIANT=cuda
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu130
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# torch.compile (distill.compile_anchor) writes C++ for CPU graphs, and Triton builds its launchers
# with a C compiler on CUDA: the slim base has neither.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends g++=4:12.2.0-3 \
    && rm -rf /var/lib/apt/lists/*
RUN case "${VARIANT}" in \
        cuda) index="https://download.pytorch.org/whl/${TORCH_CUDA}" ;; \
        cpu) index="https://download.pytorch.org/whl/cpu" ;; \
        *) echo "VARIANT must be cuda or cpu, not '${VARIANT}'" >&2; exit 1 ;; \
    esac \
    && pip install --no-cache-dir --index-url "${index}" "torch==${TORCH_VERSION}" \
    && python -c "import sys, torch; cuda = torch.version.cuda; print('torch', torch.__version__, 'CUDA', cuda); sys.exit((cuda is not None) != ('${VARIANT}' == 'cuda'))"
COPY requirements.lock /tmp/requirements.lock
# torch is already there (from its own index: a PyPI reinstall could swap the CUDA build for another).
# The lock is pip-checked as a whole; torchvision must never come in (it is in no pin, and stays out).
RUN grep -v -E '^torch==' /tmp/requirements.lock > /tmp/requirements-no-torch.txt \
    && pip install --no-cache-dir --requirement /tmp/requirements-no-torch.txt \
    && pip check \
    && if pip show torchvision >/dev/null 2>&1; then echo "torchvision must not be installed" >&2; exit 1; fi \
    && rm /tmp/requirements.lock /tmp/requirements-no-torch.txt
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build src/*.egg-info \
    && collectionlora --help >/dev/null
# Last, so a new commit does not rebuild the layers above. The registry's lineage reads it (no .git here).
ARG GIT_COMMIT=""
ENV COLLECTIONLORA_GIT_COMMIT=${GIT_COMMIT}
LABEL org.opencontainers.image.title="collectionlora" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
USER 1000:1000
