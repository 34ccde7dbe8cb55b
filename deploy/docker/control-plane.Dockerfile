# The control plane: imageflow-server with PostgreSQL, Kafka, LLM and Triton support; no dev dependencies, no tools.
# docker build -f deploy/docker/control-plane.Dockerfile -t imageflow-server:0.2.0 .
FROM python:3.11-slim AS build
RUN pip install --no-cache-dir uv==0.13.8
WORKDIR /src
COPY pyproject.toml uv.lock ./
COPY core core
COPY server server
COPY tools tools
COPY clients/python clients/python
COPY testing/pyproject.toml testing/pyproject.toml
ENV UV_PROJECT_ENVIRONMENT=/opt/imageflow UV_PYTHON_DOWNLOADS=never
RUN uv sync --frozen --no-dev --no-editable --package imageflow-server \
      --extra postgres --extra kafka --extra llm --extra triton

FROM python:3.11-slim
COPY --from=build /opt/imageflow /opt/imageflow
# Listens on all interfaces, so it refuses to start until authentication is configured (IMAGEFLOW_API_KEYS_FILE or a
# JWKS) or IMAGEFLOW_ALLOW_INSECURE=true is set on purpose; see README "Security".
ENV PATH=/opt/imageflow/bin:$PATH IMAGEFLOW_EMBEDDED_TOOLS=false IMAGEFLOW_HOST=0.0.0.0
USER 65532
EXPOSE 50051
ENTRYPOINT ["imageflow-server"]
