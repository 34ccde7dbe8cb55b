"""The offline planner on phrasings outside the public eval: negation, exceptions, partial instructions, direction
words and number forms. Nothing asked for is dropped or inverted silently."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from imageflow.common.errors import ImageflowError
from imageflow.common.structs import dict_to_struct
from imageflow.server.domain.planner.offline import OfflinePlanner
from imageflow.v1 import (
    pipeline_service_pb2,
    pipeline_service_pb2_grpc,
    tool_pb2,
    tool_registry_service_pb2,
    tool_registry_service_pb2_grpc,
    tool_service_pb2,
    tool_service_pb2_grpc,
)

PLANNER = OfflinePlanner()


def planned(instruction: str) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    ops, not_done = PLANNER.parse_all(instruction)
    return [(op.tool, op.params) for op in ops], [w for op in ops for w in op.warnings] + not_done


@pytest.mark.parametrize(
    ("instruction", "key", "below_one"),
    [
        ("明るさを下げて", "brightness", True), ("少し暗くして", "brightness", True), ("明るくして", "brightness", False),
        ("コントラストを弱めにして", "contrast", True), ("コントラストを上げて", "contrast", False),
        ("彩度を落として", "saturation", True), ("彩度を控えめに", "saturation", True), ("色を鮮やかに", "saturation", False),
        ("明るさを2割下げて", "brightness", True), ("彩度を３０％上げて", "saturation", False),
    ],
)  # fmt: skip
def test_direction_words_set_the_side_of_one(instruction: str, key: str, below_one: bool) -> None:
    steps, _ = planned(instruction)
    assert [tool for tool, _ in steps] == ["adjust"]
    assert (steps[0][1][key] < 1) is below_one


@pytest.mark.parametrize(
    ("instruction", "tools"),
    [
        ("顔はぼかさないで、白黒にして", ["grayscale"]),
        ("白黒にはしないで、半分に縮小して", ["resize"]),
        ("リサイズせずにPNGで保存して", ["encode"]),
        ("枠は不要、人物を検出するだけでいい", ["detect"]),
        ("モザイクはかけずに顔を枠で囲んで", ["detect", "draw_boxes"]),
        ("回転はやめて、上下反転だけして", ["flip"]),
        ("グレースケールにして、顔は、ぼかさないで", ["grayscale"]),  # a negation after a carried clause
    ],
)
def test_negated_clauses_plan_nothing(instruction: str, tools: list[str]) -> None:
    steps, warnings = planned(instruction)
    assert [tool for tool, _ in steps] == tools
    assert warnings == []


def test_before_puts_the_named_step_right_after_the_other() -> None:
    steps, _ = planned("画像をリサイズする前にグレースケールにして、PNGで保存して")
    assert [tool for tool, _ in steps] == ["grayscale", "resize", "encode"]


def test_negated_format_is_replaced_not_added() -> None:
    steps, _ = planned("JPEGじゃなくてWebPで保存して")
    assert steps == [("encode", {"format": "webp"})]


def test_negated_labels_turn_labels_off() -> None:
    steps, _ = planned("人物を検出して、ラベルは出さずに枠だけ描いて")
    assert steps[-1] == ("draw_boxes", {"show_labels": False})


@pytest.mark.parametrize(
    ("instruction", "classes", "method"),
    [
        ("顔以外をぼかして", ["face"], None),
        ("人物以外にモザイクをかけて", ["person"], "pixelate"),
        ("車だけ残して周りをぼかして", ["car"], None),
        ("背景をぼかして人物はそのままにして", ["person"], None),
    ],
)
def test_exceptions_blur_outside_the_named_regions(instruction: str, classes: list[str], method: str | None) -> None:
    steps, _ = planned(instruction)
    assert [tool for tool, _ in steps] == ["detect", "blur_regions"]
    assert steps[0][1]["classes"] == classes
    assert steps[1][1]["area"] == "outside" and steps[1][1].get("method") == method


@pytest.mark.parametrize(
    ("instruction", "tools", "named"),
    [
        ("空を青くして、半分に縮小して", ["resize"], "空を青くして"),
        ("文字を入れてからPNGで保存して", ["encode"], "文字を入れて"),
        ("グレースケールにしたものと、セピアにしたものを作って", ["grayscale"], "セピア"),
        ("ナンバープレートにモザイクをかけて、人の顔もぼかして", ["detect", "blur_regions"], "ナンバープレート"),
    ],
)
def test_a_part_no_tool_does_is_named_in_a_warning(instruction: str, tools: list[str], named: str) -> None:
    steps, warnings = planned(instruction)
    assert [tool for tool, _ in steps] == tools
    assert any(named in warning for warning in warnings)


async def test_nothing_doable_is_refused_naming_the_part() -> None:
    for instruction in ("上半分を切り抜いて", "アニメ風にして"):
        with pytest.raises(ImageflowError) as refused:
            await PLANNER.plan(instruction, None, {}, 1)
        assert refused.value.reason == "INSTRUCTION_NOT_DOABLE"
        assert instruction[:4] in refused.value.message


@pytest.mark.parametrize(
    ("instruction", "step"),
    [
        ("左に45度傾けて", ("rotate", {"angle": 45})),
        ("右に30度回して", ("rotate", {"angle": -30})),
        ("反時計回りに90度回転", ("rotate", {"angle": 90})),
        ("上下逆さまにして", ("rotate", {"angle": 180})),
        ("画像を3分の1に縮小して", ("resize", {"scale": 0.3333})),
        ("幅を８００ピクセルにして", ("resize", {"width": 800})),
        ("２倍に拡大して", ("resize", {"scale": 2})),
        ("長辺1920pxに縮小", ("resize", {"max_side": 1920})),
        ("人の顔にモザイク（ブロック32）", ("blur_regions", {"method": "pixelate", "block": 32})),
        ("猫を見つけて赤い枠で囲んで", ("draw_boxes", {"color": "red"})),
        ("ノイズを除去して", ("blur", {"method": "median"})),
    ],
)
def test_numbers_units_and_directions(instruction: str, step: tuple[str, dict[str, Any]]) -> None:
    steps, _ = planned(instruction)
    assert steps[-1] == step


class VignetteService(tool_service_pb2_grpc.ToolServiceServicer):
    """A third-party tool service the reference catalog knows nothing about."""

    async def Describe(self, request: Any, context: Any) -> tool_service_pb2.DescribeResponse:
        tool = tool_pb2.Tool(name="vignette", version="1.0.0", description_ja="周辺を暗くする",
                             params_schema=dict_to_struct({"type": "object", "properties": {}}),
                             phrases_ja=["ビネット", "周辺減光"])  # fmt: skip
        tool.inputs.add(name="image", type=tool_pb2.PORT_TYPE_IMAGE, required=True)
        tool.outputs.add(name="image", type=tool_pb2.PORT_TYPE_IMAGE)
        return tool_service_pb2.DescribeResponse(service="vignette-grpc", tools=[tool])

    async def Process(self, request: tool_service_pb2.ProcessRequest, context: Any) -> tool_service_pb2.ProcessResponse:
        return tool_service_pb2.ProcessResponse(image=request.image)


async def test_a_registered_tools_phrases_are_planned_offline(
    pipelines: pipeline_service_pb2_grpc.PipelineServiceStub,
    registry: tool_registry_service_pb2_grpc.ToolRegistryServiceStub,
) -> None:
    instruction = "ビネット（周辺減光）を入れて、長辺1200pxに縮小"
    before = await pipelines.GeneratePipeline(pipeline_service_pb2.GeneratePipelineRequest(instruction=instruction))
    assert [s.tool for s in before.pipeline.steps] == ["resize"] and before.warnings  # not done, and said so
    server = grpc.aio.server()
    tool_service_pb2_grpc.add_ToolServiceServicer_to_server(VignetteService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        await registry.RegisterTool(tool_registry_service_pb2.RegisterToolRequest(address=f"127.0.0.1:{port}"))
        after = await pipelines.GeneratePipeline(pipeline_service_pb2.GeneratePipelineRequest(instruction=instruction))
        assert [s.tool for s in after.pipeline.steps] == ["vignette", "resize"] and not after.warnings
        assert after.planner == "offline"
    finally:
        await registry.RemoveTool(tool_registry_service_pb2.RemoveToolRequest(name="vignette"))
        await server.stop(0)


async def test_reference_tools_publish_their_phrases_and_the_planner_falls_back_on_them(
    pipelines: pipeline_service_pb2_grpc.PipelineServiceStub,
    registry: tool_registry_service_pb2_grpc.ToolRegistryServiceStub,
) -> None:
    listed = await registry.ListTools(tool_registry_service_pb2.ListToolsRequest())
    phrases = {tool.name: list(tool.phrases_ja) for tool in listed.tools}
    assert "サイズ変更" in phrases["resize"] and "モザイク" in phrases["blur_regions"]
    reply = await pipelines.GeneratePipeline(
        pipeline_service_pb2.GeneratePipelineRequest(instruction="画像のサイズ変更をお願い")
    )  # no grammar rule says サイズ変更; the manifest phrase does
    assert [s.tool for s in reply.pipeline.steps] == ["resize"] and reply.warnings
