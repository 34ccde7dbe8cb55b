"""NVIDIA Triton: the bundled CPU server launcher and the python-backend model that serves the ONNX files."""
