"""Python SDK and CLI for the ImageFlow control plane."""

from imageflow.client.sdk import (
    AsyncImageflowClient,
    ImageflowClient,
    ImageflowClientError,
    image_from_file,
    tls_credentials,
)

__all__ = ["AsyncImageflowClient", "ImageflowClient", "ImageflowClientError", "image_from_file", "tls_credentials"]
