"""Which tools each reference service serves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imageflow.tools import filters, geometry
from imageflow.tools.detection import SERVICE as DETECTION_SERVICE
from imageflow.tools.detection import Detector, InferenceBackend, OnnxRuntimeBackend, detect_tool
from imageflow.tools.spec import ToolSpec

SERVICES = ("resize", "filter", "detection")
DEFAULT_MODEL_REPOSITORY = Path(__file__).resolve().parents[2] / "deploy" / "triton" / "models"


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
        detector = Detector(backend or OnnxRuntimeBackend(model_repository))
        return ServiceCatalog(DETECTION_SERVICE, (detect_tool(detector),))
    raise ValueError(f"unknown tool service {kind!r}; choose one of {SERVICES}")
