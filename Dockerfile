# The ballot model service: ONNX Runtime behind FastAPI/uvicorn. No torch, no training stack.
#   docker build -t ballot-serve .
#   docker run -p 8000:8000 -v $PWD/model.onnx:/models/model.onnx:ro -e BALLOT_MODEL_URI=/models/model.onnx ballot-serve
#   docker run -p 8000:8000 -e MLFLOW_TRACKING_URI=http://mlflow:5000 ballot-serve   # models:/ballot-fashion-mnist@champion
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY requirements-serve.txt constraints.txt ./
RUN pip install --no-cache-dir -r requirements-serve.txt -c constraints.txt \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin ballot
COPY serving/ serving/

USER ballot
ENV BALLOT_HOST=0.0.0.0 \
    BALLOT_PORT=8000 \
    BALLOT_MODEL_URI=models:/ballot-fashion-mnist@champion \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["python", "-m", "serving.healthcheck"]
CMD ["python", "-m", "serving"]
