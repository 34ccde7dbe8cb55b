# One image for the control plane, the tool services and the model repository (models converted at build time).
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends nodejs npm make && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN python -m venv /opt/imageflow && /opt/imageflow/bin/pip install --no-cache-dir ".[dev]" \
 && /opt/imageflow/bin/python scripts/fetch_models.py

FROM python:3.11-slim
COPY --from=build /opt/imageflow /opt/imageflow
COPY --from=build /src/deploy/triton /app/deploy/triton
ENV PATH=/opt/imageflow/bin:$PATH IMAGEFLOW_MODEL_REPOSITORY=/app/deploy/triton/models
USER 65532
EXPOSE 50051
ENTRYPOINT ["imageflow-server"]
