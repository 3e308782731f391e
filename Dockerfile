# The backend image: web app (`python -m ml_backend serve`) and worker (`python -m ml_backend worker`).
# torch from PyPI ships its CUDA runtime, so the same image runs the GPU worker (with the NVIDIA
# container toolkit on the host) and the CPU one.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_HOME=/opt/torch \
    MODEL_DIR=/data/models

WORKDIR /app

# Dependencies first, so code changes do not reinstall them.
COPY requirements.txt ./
RUN pip install -r requirements.txt

# ImageNet ResNet18 weights at build time: the containers then start without internet access.
RUN python -c "import torchvision; torchvision.models.resnet18(weights=torchvision.models.ResNet18_Weights.IMAGENET1K_V1)" \
    && chmod -R a+rX "$TORCH_HOME"

COPY ml_backend ./ml_backend
COPY label_config.xml ./

RUN useradd --create-home --uid 1000 mlbackend \
    && mkdir -p /data/models \
    && chown -R mlbackend /data
USER mlbackend

EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=4)"

# All interfaces with BASIC_AUTH_USER/BASIC_AUTH_PASS set, loopback only without (unreachable
# from outside the container, on purpose): `serve` decides and says which at start.
CMD ["python", "-m", "ml_backend", "serve", "--port", "9090"]
