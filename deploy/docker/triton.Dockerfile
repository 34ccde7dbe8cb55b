# Triton with ImageFlow's production model repository (onnxruntime backend, KIND_GPU) baked in.
# docker build -f deploy/docker/triton.Dockerfile -t imageflow-triton:0.2.0 .   (after building imageflow-tools:0.2.0)
FROM imageflow-tools:0.2.0 AS tools

FROM nvcr.io/nvidia/tritonserver:24.10-py3
COPY --from=tools /models/ /models/
EXPOSE 8000 8001 8002
CMD ["tritonserver", "--model-repository=/models"]
