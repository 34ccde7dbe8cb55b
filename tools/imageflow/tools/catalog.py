"""Which tools each reference service serves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imageflow.tools import filters, geometry
from imageflow.tools.detection import (
    DEFAULT_OBJECT_LABELS,
    OBJECT_MODEL,
    Detector,
    InferenceBackend,
    ObjectLabels,
    OnnxRuntimeBackend,
    detect_tool,
)
from imageflow.tools.detection import SERVICE as DETECTION_SERVICE
from imageflow.tools.spec import ToolSpec

SERVICES = ("resize", "filter", "detection")
DEFAULT_MODEL_REPOSITORY = Path(__file__).resolve().parent / "models"
"""The models shipped inside this package (a Triton-layout repository; `IMAGEFLOW_MODEL_REPOSITORY` overrides it)."""


@dataclass(frozen=True)
class ServiceCatalog:
    """A service's public name and its tools."""

    service: str
    tools: tuple[ToolSpec, ...]


def catalog(
    kind: str, model_repository: Path = DEFAULT_MODEL_REPOSITORY, backend: InferenceBackend | None = None
) -> ServiceCatalog:
    """The tools of `resize`, `filter` or `detection`."""
    if kind == "resize":
        return ServiceCatalog(geometry.SERVICE, geometry.TOOLS)
    if kind == "filter":
        return ServiceCatalog(filters.SERVICE, filters.TOOLS)
    if kind == "detection":
        label_map = model_repository / OBJECT_MODEL / "labels.txt"
        labels = ObjectLabels.load(label_map) if label_map.is_file() else DEFAULT_OBJECT_LABELS
        detector = Detector(backend or OnnxRuntimeBackend(model_repository), labels)
        return ServiceCatalog(DETECTION_SERVICE, (detect_tool(detector),))
    raise ValueError(f"unknown tool service {kind!r}; choose one of {SERVICES}")
