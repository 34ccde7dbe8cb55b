"""ai-detection-grpc: `detect` with SSD MobileNetV2 (Open Images v4 subset) and BlazeFace, anchors + NMS here."""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import numpy.typing as npt
from imageflow.common.errors import failed_precondition
from imageflow.tools.imaging import Pixels, to_rgb
from imageflow.tools.spec import (
    DETECTIONS_OUT,
    IMAGE_OUT,
    Box,
    Detection,
    ToolInput,
    ToolOutput,
    ToolSpec,
    object_schema,
)

VERSION = "1.0.0"
SERVICE = "ai-detection-grpc"

FloatArray = npt.NDArray[np.float32]

OBJECT_MODEL = "ssd_mobilenetv2_oidv4"
FACE_MODEL = "blazeface_short_range"
OBJECT_INPUT, OBJECT_BOXES, OBJECT_SCORES = (
    "normalized_input_image_tensor",
    "raw_outputs/box_encodings",
    "raw_outputs/class_predictions",
)
FACE_INPUT, FACE_BOXES, FACE_SCORES = "input", "regressors", "classificators"
FACE_LABEL = "face"
NMS_IOU = 0.45


class InferenceBackend(Protocol):
    """Runs one model on one NCHW float32 tensor and returns its named outputs."""

    def infer(self, model: str, input_name: str, tensor: FloatArray, outputs: Sequence[str]) -> dict[str, FloatArray]:
        """Run `model`."""
        ...  # pragma: no cover


class OnnxRuntimeBackend:
    """The embedded default: the model repository's ONNX files run in-process with onnxruntime."""

    def __init__(self, model_repository: Path, threads: int = 2) -> None:
        self._repository = model_repository
        self._threads = threads
        self._sessions: dict[str, object] = {}
        self._lock = threading.Lock()

    def _session(self, model: str) -> object:
        import onnxruntime as ort  # imported lazily: only the detection service needs it

        with self._lock:
            if model not in self._sessions:
                path = self._repository / model / "1" / "model.onnx"
                if not path.is_file():
                    raise failed_precondition(
                        "MODEL_MISSING", f"model file {path} is missing; run `make models` to fetch and convert it"
                    )
                options = ort.SessionOptions()
                options.intra_op_num_threads = self._threads
                self._sessions[model] = ort.InferenceSession(
                    str(path), sess_options=options, providers=["CPUExecutionProvider"]
                )
            return self._sessions[model]

    def infer(self, model: str, input_name: str, tensor: FloatArray, outputs: Sequence[str]) -> dict[str, FloatArray]:
        """Run `model` with onnxruntime."""
        session = self._session(model)
        results = session.run(list(outputs), {input_name: tensor})  # type: ignore[attr-defined]
        return dict(zip(outputs, results, strict=True))


def ssd_anchors(
    input_size: int,
    strides: Sequence[int],
    min_scale: float,
    max_scale: float,
    aspect_ratios: Sequence[float],
    *,
    reduce_lowest_layer: bool = False,
    fixed_size: bool = False,
) -> FloatArray:
    """SSD anchors (cx, cy, w, h), normalised, in the order the networks emit them."""
    layers = len(strides)

    def scale(index: int) -> float:
        return min_scale + (max_scale - min_scale) * index / (layers - 1)

    anchors: list[tuple[float, float, float, float]] = []
    layer = 0
    while layer < layers:
        shapes: list[tuple[float, float]] = []
        last = layer
        while last < layers and strides[last] == strides[layer]:
            current = scale(last)
            if last == 0 and reduce_lowest_layer:
                shapes += [(0.1, 1.0), (current, 2.0), (current, 0.5)]
            else:
                shapes += [(current, ratio) for ratio in aspect_ratios]
                following = 1.0 if last == layers - 1 else scale(last + 1)
                shapes.append((math.sqrt(current * following), 1.0))
            last += 1
        cells = math.ceil(input_size / strides[layer])
        for y in range(cells):
            for x in range(cells):
                for size, ratio in shapes:
                    cx, cy = (x + 0.5) / cells, (y + 0.5) / cells
                    if fixed_size:
                        anchors.append((cx, cy, 1.0, 1.0))
                    else:
                        anchors.append((cx, cy, size * math.sqrt(ratio), size / math.sqrt(ratio)))
        layer = last
    return np.asarray(anchors, dtype=np.float32)


OBJECT_ANCHORS = ssd_anchors(
    300, [16, 32, 64, 128, 256, 512], 0.2, 0.95, [1.0, 2.0, 0.5, 3.0, 1 / 3], reduce_lowest_layer=True
)
FACE_ANCHORS = ssd_anchors(128, [8, 16, 16, 16], 0.1484375, 0.75, [1.0], fixed_size=True)


def _sigmoid(values: FloatArray) -> FloatArray:
    return 1.0 / (1.0 + np.exp(-np.clip(values, -80.0, 80.0)))


def _nms(boxes: FloatArray, scores: FloatArray, min_score: float, limit: int) -> list[int]:
    if len(scores) == 0:
        return []
    kept = cv2.dnn.NMSBoxes(boxes.tolist(), scores.tolist(), min_score, NMS_IOU, top_k=limit)
    return [int(i) for i in np.asarray(kept).reshape(-1)][:limit]


@dataclass(frozen=True)
class ObjectLabels:
    """Lowercase class names of the object model, by output index (index 0 is background)."""

    names: tuple[str, ...]

    @classmethod
    def load(cls, path: Path) -> ObjectLabels:
        """Read a label map, one name a line."""
        lines = [line.strip().lower() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return cls(tuple(lines))


DEFAULT_OBJECT_LABELS = ObjectLabels(
    (
        "???", "bicycle", "boot", "laptop", "person", "chair", "cattle", "desk", "cat", "computer mouse",
        "computer monitor", "box", "mug", "coffee cup", "stationary bicycle", "table", "bottle", "high heels",
        "vehicle", "footwear", "dog", "book", "camera", "car",
    )
)  # fmt: skip
KNOWN_CLASSES = tuple(sorted({*DEFAULT_OBJECT_LABELS.names[1:], FACE_LABEL}))


class Detector:
    """Pre-processing, inference through a backend, anchor decoding and NMS."""

    def __init__(self, backend: InferenceBackend, labels: ObjectLabels = DEFAULT_OBJECT_LABELS) -> None:
        self._backend = backend
        self._labels = labels

    def detect(self, pixels: Pixels, classes: Sequence[str], min_score: float, limit: int) -> list[Detection]:
        """Objects and faces of the wanted classes (all when empty), best first."""
        rgb = to_rgb(pixels)
        wanted = {c.lower() for c in classes}
        found: list[Detection] = []
        if not wanted or wanted - {FACE_LABEL}:
            found += self._objects(rgb, wanted, min_score, limit)
        if not wanted or FACE_LABEL in wanted:
            found += self._faces(rgb, min_score, limit)
        found.sort(key=lambda d: d.score, reverse=True)
        return found[:limit]

    def _objects(self, rgb: Pixels, wanted: set[str], min_score: float, limit: int) -> list[Detection]:
        height, width = rgb.shape[:2]
        tensor = _normalise(cv2.resize(rgb, (300, 300), interpolation=cv2.INTER_AREA))
        out = self._backend.infer(OBJECT_MODEL, OBJECT_INPUT, tensor, (OBJECT_BOXES, OBJECT_SCORES))
        encodings = out[OBJECT_BOXES].reshape(-1, 4)
        scores = _sigmoid(out[OBJECT_SCORES].reshape(len(encodings), -1))
        scores[:, 0] = 0.0
        label_index = scores.argmax(axis=1)
        best = scores[np.arange(len(scores)), label_index]
        anchors = OBJECT_ANCHORS
        cy = encodings[:, 0] / 10.0 * anchors[:, 3] + anchors[:, 1]
        cx = encodings[:, 1] / 10.0 * anchors[:, 2] + anchors[:, 0]
        h = np.exp(encodings[:, 2] / 5.0) * anchors[:, 3]
        w = np.exp(encodings[:, 3] / 5.0) * anchors[:, 2]
        boxes = np.stack([(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height], axis=1)
        results: list[Detection] = []
        for index, name in enumerate(self._labels.names):
            if index == 0 or (wanted and name not in wanted):
                continue
            members = np.where((label_index == index) & (best >= min_score))[0]
            for keep in _nms(boxes[members], best[members], min_score, limit):
                i = members[keep]
                results.append(_detection(name, float(best[i]), boxes[i], width, height))
        return results

    def _faces(self, rgb: Pixels, min_score: float, limit: int) -> list[Detection]:
        height, width = rgb.shape[:2]
        side = max(width, height)
        scale = 128.0 / side
        resized = cv2.resize(
            rgb, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA
        )
        pad_x, pad_y = (128 - resized.shape[1]) // 2, (128 - resized.shape[0]) // 2
        canvas = np.zeros((128, 128, 3), np.uint8)
        canvas[pad_y : pad_y + resized.shape[0], pad_x : pad_x + resized.shape[1]] = resized
        out = self._backend.infer(FACE_MODEL, FACE_INPUT, _normalise(canvas), (FACE_BOXES, FACE_SCORES))
        regress = out[FACE_BOXES].reshape(-1, 16)
        scores = _sigmoid(out[FACE_SCORES].reshape(-1))
        cx = regress[:, 0] / 128.0 + FACE_ANCHORS[:, 0]
        cy = regress[:, 1] / 128.0 + FACE_ANCHORS[:, 1]
        w = regress[:, 2] / 128.0
        h = regress[:, 3] / 128.0
        # letterboxed 128x128 -> original pixels
        boxes = np.stack(
            [
                ((cx - w / 2) * 128 - pad_x) / scale,
                ((cy - h / 2) * 128 - pad_y) / scale,
                w * 128 / scale,
                h * 128 / scale,
            ],
            axis=1,
        )
        members = np.where(scores >= min_score)[0]
        return [
            _detection(FACE_LABEL, float(scores[members[k]]), boxes[members[k]], width, height)
            for k in _nms(boxes[members], scores[members], min_score, limit)
        ]


def _normalise(rgb: Pixels) -> FloatArray:
    """HWC uint8 to NCHW float32 in [-1, 1]."""
    tensor = rgb.astype(np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(tensor.transpose(2, 0, 1)[None])


def _detection(label: str, score: float, box: FloatArray, width: int, height: int) -> Detection:
    x0 = float(np.clip(box[0], 0, width))
    y0 = float(np.clip(box[1], 0, height))
    x1 = float(np.clip(box[0] + box[2], 0, width))
    y1 = float(np.clip(box[1] + box[3], 0, height))
    return Detection(label=label, score=round(score, 4), box=Box(x0, y0, x1 - x0, y1 - y0))


def detect_tool(detector: Detector) -> ToolSpec:
    """The `detect` tool bound to a detector."""

    def run(inp: ToolInput) -> ToolOutput:
        found = detector.detect(
            inp.pixels, inp.params["classes"], float(inp.params["min_score"]), int(inp.params["max_detections"])
        )
        counts = Counter(det.label for det in found)
        return ToolOutput(pixels=None, detections=found, metadata={"counts": dict(counts)})

    return ToolSpec(
        name="detect",
        phrases_ja=("検出", "見つけ"),
        version=VERSION,
        description_ja=(
            "物体を検出する（classes は英語小文字のクラス名: person, face, car, dog, cat, bicycle, vehicle など。"
            "空 = すべて。min_score は信頼度のしきい値）。画像はそのまま次へ渡す"
        ),
        description_en="Detect objects and faces (SSD MobileNetV2 OIDv4 + BlazeFace); image passes through.",
        params_schema=object_schema(
            {
                "classes": {
                    "type": "array",
                    "items": {"enum": list(KNOWN_CLASSES)},
                    "uniqueItems": True,
                    "default": [],
                    "description": "class names; empty = all",
                },
                "min_score": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5},
                "max_detections": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
            }
        ),
        run=run,
        outputs=(IMAGE_OUT, DETECTIONS_OUT),
    )
