#!/usr/bin/env python3
"""Fetch the detection models from registry packages, check SHA-256, convert to ONNX, lay out a Triton repository.

Sources (both Apache-2.0, see deploy/triton/MODELS.md):
- SSD MobileNetV2 (Open Images v4, 24 classes): npm `@mediapipe/objectron@0.4.1675468480`, carved out of
  `objectron_solution_packed_assets.data` at the offsets its loader script lists.
- BlazeFace short range: PyPI wheel `mediapipe==0.10.21`,
  `mediapipe/modules/face_detection/face_detection_short_range.tflite`.

Run by `make models` (part of `make install`), never at run time. Idempotent: finished files are kept.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "models"
REPOSITORY = ROOT / "tools" / "imageflow" / "tools" / "models"

OBJECTRON_PACKAGE = "@mediapipe/objectron@0.4.1675468480"
MEDIAPIPE_WHEEL = "mediapipe==0.10.21"
FACE_MEMBER = "mediapipe/modules/face_detection/face_detection_short_range.tflite"

SHA256 = {
    "ssd_mobilenetv2_oidv4.tflite": "d0a5255bf8c4f5a0bc4240741a76c41d5e939f7655078f945f50ab53a9375da6",
    "oidv4_labelmap.txt": "c148336a65f673013609a923fdcbdeec0f49df935045029c3746a3828a0e80e0",
    "blazeface_short_range.tflite": "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8",
}
MODELS = {
    "ssd_mobilenetv2_oidv4": "ssd_mobilenetv2_oidv4.tflite",
    "blazeface_short_range": "blazeface_short_range.tflite",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check(path: Path) -> None:
    want = SHA256[path.name]
    got = sha256(path)
    if got != want:
        path.unlink()
        sys.exit(f"SHA-256 mismatch for {path.name}: got {got}, want {want}")


def pip_command() -> list[str]:
    """pip for `pip download`: this interpreter's, else the one beside uv in .tools (uv's venvs carry no pip)."""
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    bootstrap = ROOT / ".tools" / "uv" / "bin" / "pip"
    return [str(bootstrap)] if bootstrap.exists() else ["pip3"]


def fetch_objectron() -> None:
    tflite, labels = CACHE / "ssd_mobilenetv2_oidv4.tflite", CACHE / "oidv4_labelmap.txt"
    if tflite.exists() and labels.exists():
        return
    work = CACHE / "npm"
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["npm", "pack", OBJECTRON_PACKAGE, "--silent"], cwd=work, check=True, stdout=subprocess.DEVNULL)
    archive = next(work.glob("mediapipe-objectron-*.tgz"))
    with tarfile.open(archive) as tar:
        loader = tar.extractfile("package/objectron_solution_packed_assets_loader.js")
        packed = tar.extractfile("package/objectron_solution_packed_assets.data")
        assert loader is not None and packed is not None
        manifest = re.search(r"loadPackage\((\{.*?\})\);", loader.read().decode("utf-8"), re.S)
        if manifest is None:
            sys.exit("cannot find the asset table in the objectron loader script")
        data = packed.read()
    for entry in json.loads(manifest.group(1))["files"]:
        name = entry["filename"].rsplit("/", 1)[-1]
        if name == "object_detection_ssd_mobilenetv2_oidv4_fp16.tflite":
            tflite.write_bytes(data[entry["start"] : entry["end"]])
        elif name == "object_detection_oidv4_labelmap.txt":
            labels.write_bytes(data[entry["start"] : entry["end"]])
    check(tflite)
    check(labels)
    shutil.rmtree(work)


def fetch_blazeface() -> None:
    target = CACHE / "blazeface_short_range.tflite"
    if target.exists():
        return
    work = CACHE / "pip"
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            *pip_command(), "download", "--quiet", "--no-deps", "--only-binary=:all:",
            "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "-d", str(work), MEDIAPIPE_WHEEL,
        ],
        check=True,
    )  # fmt: skip
    wheel = next(work.glob("mediapipe-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        target.write_bytes(archive.read(FACE_MEMBER))
    check(target)
    shutil.rmtree(work)


def convert(model: str, source: str) -> None:
    destination = REPOSITORY / model / "1" / "model.onnx"
    if destination.exists():
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    converter = Path(sys.executable).with_name("tflite2onnx")
    subprocess.run(
        [str(converter), str(CACHE / source), str(destination)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import onnxruntime as ort

    session = ort.InferenceSession(str(destination), providers=["CPUExecutionProvider"])
    print(f"{model}: {destination.relative_to(ROOT)} inputs={[i.shape for i in session.get_inputs()]}")


def build_sepia() -> None:
    """A tiny image-to-image model (UINT8 HWC in and out), written from code, to show Triton models as tools."""
    destination = REPOSITORY / "sepia_tone" / "1" / "model.onnx"
    if destination.exists():
        return
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    matrix = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], np.float32).T
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["image"], ["pixels"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["pixels", "matrix"], ["toned"]),
            helper.make_node("Clip", ["toned", "low", "high"], ["clipped"]),
            helper.make_node("Cast", ["clipped"], ["sepia"], to=TensorProto.UINT8),
        ],
        "sepia_tone",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["height", "width", 3])],
        [helper.make_tensor_value_info("sepia", TensorProto.UINT8, ["height", "width", 3])],
        [
            numpy_helper.from_array(matrix, "matrix"),
            numpy_helper.from_array(np.array(0, np.float32), "low"),
            numpy_helper.from_array(np.array(255, np.float32), "high"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="imageflow")
    model.ir_version = 8
    onnx.checker.check_model(model)
    destination.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(destination))
    print(f"sepia_tone: {destination.relative_to(ROOT)}")


def main() -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    build_sepia()
    fetch_objectron()
    fetch_blazeface()
    for model, source in MODELS.items():
        convert(model, source)
    labels = REPOSITORY / "ssd_mobilenetv2_oidv4" / "labels.txt"
    if not labels.exists():
        shutil.copyfile(CACHE / "oidv4_labelmap.txt", labels)
    print("models ready in", REPOSITORY.relative_to(ROOT))


if __name__ == "__main__":
    main()
