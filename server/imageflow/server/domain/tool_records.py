"""Registered tools as the control plane sees them (manifest + where to reach it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from imageflow.common.structs import struct_to_dict
from imageflow.server.domain.schemas import safe_validator
from imageflow.v1 import tool_pb2
from jsonschema.protocols import Validator

IMAGE_PORT = tool_pb2.PORT_TYPE_IMAGE
DETECTIONS_PORT = tool_pb2.PORT_TYPE_DETECTIONS


@dataclass(frozen=True)
class RegisteredTool:
    """A manifest stored by the registry, with its schema as a dict."""

    manifest: tool_pb2.Tool
    schema: dict[str, Any] = field(compare=False)
    validator: Validator = field(compare=False)
    """Validates params against `schema` without fetching `$ref`s and with RE2 patterns."""

    @classmethod
    def of(cls, manifest: tool_pb2.Tool) -> RegisteredTool:
        """Wrap a manifest (its schema checked by the registry beforehand)."""
        schema = struct_to_dict(manifest.params_schema)
        return cls(manifest, schema, safe_validator(schema))

    @property
    def name(self) -> str:
        """Tool name."""
        return self.manifest.name

    @property
    def address(self) -> str:
        """Where the registry dials it."""
        return self.manifest.address

    def input_type(self, port: str) -> int | None:
        """Type of an input port, None when there is no such port."""
        return next((p.type for p in self.manifest.inputs if p.name == port), None)

    def output_type(self, port: str) -> int | None:
        """Type of an output port, None when there is no such port."""
        return next((p.type for p in self.manifest.outputs if p.name == port), None)

    @property
    def chainable(self) -> bool:
        """Whether its service also takes it inside ToolService.ProcessChain."""
        return self.manifest.chainable and self.manifest.kind == tool_pb2.TOOL_KIND_SERVICE

    @property
    def reads_luma(self) -> bool:
        """Whether it uses only the gray of its image (its image input may be sent as raw gray)."""
        return self.manifest.reads_luma

    @property
    def keeps_luma(self) -> bool:
        """Whether the gray of its output is it run on the gray of its input (the luma decision looks through it)."""
        return self.manifest.keeps_luma

    @property
    def streams_frames(self) -> bool:
        """Whether its service takes frames in pieces (ToolService.ProcessChainStream)."""
        return self.manifest.streams_frames and self.manifest.kind == tool_pb2.TOOL_KIND_SERVICE

    @property
    def takes_branches(self) -> bool:
        """Whether its service runs several chains on one image in one call (ToolService.ProcessBranches)."""
        return self.manifest.takes_branches and self.manifest.kind == tool_pb2.TOOL_KIND_SERVICE

    @property
    def produces_detections(self) -> bool:
        """Whether it has a detections output."""
        return any(p.type == DETECTIONS_PORT for p in self.manifest.outputs)
