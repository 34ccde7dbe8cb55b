"""What a tool is: a manifest (schema, ports, descriptions) and a pure function over pixels."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from imageflow.common.params import JsonObject, check_params, with_defaults

__all__ = ["JsonObject"]
from imageflow.tools.imaging import Pixels


@dataclass(frozen=True)
class Box:
    """Pixels of the image the detector saw."""

    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Detection:
    """One object found by `detect`."""

    label: str
    score: float
    box: Box


@dataclass
class ToolInput:
    """What a tool function receives."""

    pixels: Pixels
    params: JsonObject
    detections: list[Detection] = field(default_factory=list)
    source_size: tuple[int, int] | None = None
    """Width and height of the image as encoded, when it was decoded smaller (JPEG shrink-on-load)."""


@dataclass
class ToolOutput:
    """What a tool function returns; `pixels` None means the input image passes through."""

    pixels: Pixels | None = None
    detections: list[Detection] = field(default_factory=list)
    metadata: JsonObject = field(default_factory=dict)
    encode_media_type: str = ""
    encode_quality: int = 0


IMAGE = "PORT_TYPE_IMAGE"
DETECTIONS = "PORT_TYPE_DETECTIONS"


@dataclass(frozen=True)
class PortSpec:
    """A named, typed port."""

    name: str
    type: str
    required: bool = False


IMAGE_IN = PortSpec("image", IMAGE, required=True)
DETECTIONS_IN = PortSpec("detections", DETECTIONS, required=True)
IMAGE_OUT = PortSpec("image", IMAGE)
DETECTIONS_OUT = PortSpec("detections", DETECTIONS)


@dataclass(frozen=True)
class ToolSpec:
    """A tool's manifest and implementation."""

    name: str
    version: str
    description_ja: str
    description_en: str
    params_schema: JsonObject
    run: Callable[[ToolInput], ToolOutput]
    inputs: tuple[PortSpec, ...] = (IMAGE_IN,)
    outputs: tuple[PortSpec, ...] = (IMAGE_OUT,)
    phrases_ja: tuple[str, ...] = ()
    """Japanese words naming the operation (published in Describe: the offline planner's lexicon)."""
    decode_reduction: Callable[[JsonObject, int, int], int] | None = None
    """For an encoded JPEG input of the given size: decode at 1/2, 1/4 or 1/8 (libjpeg's DCT scaling) when the tool
    is about to shrink by at least that much anyway; returns 1 for a full decode."""
    output_size: Callable[[JsonObject, int, int], tuple[int, int]] | None = None
    """For a tool whose output can be larger than its input: the output's width and height for these params and
    input size, so a request over the pixel limit is refused before anything is allocated. None: never larger."""
    reads_luma: bool = False
    """The tool uses only the gray (BT.601 luma) of its image (grayscale, threshold, edge_detect): an image headed
    only for such tools may be decoded as luma alone (a JPEG's Y plane, no chroma)."""
    keeps_luma: bool = False
    """The gray of the tool's output is the tool run on the gray of its input, up to rounding (resize, crop, flip):
    the luma-only decision looks through it."""

    def validated_params(self, params: Mapping[str, Any]) -> JsonObject:
        """Check params against the schema and fill in the schema's defaults."""
        check_params(self.params_schema, params, prefix="params")
        return with_defaults(self.params_schema, params)


def object_schema(properties: JsonObject, required: list[str] | None = None, **extra: Any) -> JsonObject:
    """A closed JSON Schema object (no unknown keys)."""
    schema: JsonObject = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = required
    schema.update(extra)
    return schema
