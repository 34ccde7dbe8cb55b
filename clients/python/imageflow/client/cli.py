"""`imageflow`: generate, run and inspect pipelines from a terminal (typer + rich, Japanese-friendly output)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import typer
from google.protobuf import json_format
from google.protobuf.message import Message
from imageflow.client.sdk import DEFAULT_TARGET, ImageflowClient, ImageflowClientError, image_from_file, tls_credentials
from imageflow.common.states import TERMINAL_STATES
from imageflow.common.structs import struct_to_dict
from imageflow.v1 import execution_pb2, pipeline_pb2
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="ImageFlow client: 日本語の指示から画像処理パイプラインを作って実行します。",
)
pipelines_app = typer.Typer(no_args_is_help=True, help="Saved pipelines.")
app.add_typer(pipelines_app, name="pipelines")
console = Console()
errors = Console(stderr=True)
TargetOption = typer.Option(DEFAULT_TARGET, "--target", "-t", envvar="IMAGEFLOW_TARGET", help="control plane host:port")
EXTENSION_FORMAT = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
MEDIA_EXTENSION = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/bmp": ".bmp",
    "image/tiff": ".tiff",
}
STATE_STYLE = {"SUCCEEDED": "green", "PARTIALLY_SUCCEEDED": "yellow", "FAILED": "red", "CANCELLED": "magenta"}


@dataclass
class Connection:
    """How every command connects (set once by the top-level options)."""

    token: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    tls: bool = False


connection = Connection()


@app.callback()
def connect(
    token: str | None = typer.Option(
        None, "--token", envvar="IMAGEFLOW_TOKEN", help="API key or JWT, sent as 'authorization: Bearer'"
    ),
    tls: bool = typer.Option(False, "--tls", envvar="IMAGEFLOW_TLS", help="use TLS (system CAs unless --ca)"),
    ca: Path | None = typer.Option(
        None, "--ca", envvar="IMAGEFLOW_CA_FILE", help="CA certificate (PEM); implies --tls"
    ),
    cert: Path | None = typer.Option(
        None, "--cert", envvar="IMAGEFLOW_CLIENT_CERT_FILE", help="client certificate for mTLS (PEM)"
    ),
    key: Path | None = typer.Option(None, "--key", envvar="IMAGEFLOW_CLIENT_KEY_FILE", help="client key for mTLS"),
) -> None:
    """Connection options shared by every command."""
    connection.token, connection.ca, connection.cert, connection.key = token, ca, cert, key
    connection.tls = tls or ca is not None or cert is not None


def _fail(error: ImageflowClientError) -> typer.Exit:
    errors.print(f"[red]エラー[/red] {error.code}: {error.message}")
    for field, description in error.violations:
        errors.print(f"  • {field}: {description}")
    return typer.Exit(code=2)


@contextmanager
def _connected(target: str) -> Iterator[ImageflowClient]:
    """A client whose failed calls end the command with a clear message and exit code 2 (no traceback)."""
    try:
        credentials = tls_credentials(connection.ca, connection.cert, connection.key) if connection.tls else None
    except ValueError as error:
        errors.print(f"[red]エラー[/red] TLS: {error}")
        raise typer.Exit(code=2) from None
    with ImageflowClient(target, token=connection.token, credentials=credentials) as client:
        try:
            yield client
        except ImageflowClientError as error:
            raise _fail(error) from None


def _table(title: str, *columns: str) -> Table:
    """A table whose long cells wrap (fold) instead of being cut, on a terminal or piped."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _emit_json(data: object) -> None:
    """One JSON document on stdout (UTF-8, Japanese as is)."""
    print(json.dumps(data, ensure_ascii=False))


def _message_json(message: Message) -> dict[str, object]:
    """A protobuf message as JSON, image bytes left out (they go to -o files): `data` becomes `data_bytes`."""
    data: dict[str, object] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    _drop_image_bytes(data)
    return data


def _drop_image_bytes(node: object) -> None:
    if isinstance(node, dict):
        if isinstance(node.get("data"), str) and "media_type" in node:
            node["data_bytes"] = len(base64.b64decode(node.pop("data")))
        for value in node.values():
            _drop_image_bytes(value)
    elif isinstance(node, list):
        for value in node:
            _drop_image_bytes(value)


def _pipeline_table(pipeline: pipeline_pb2.Pipeline, explanations: dict[str, str] | None = None) -> Table:
    title = (
        f"pipeline {pipeline.id} v{pipeline.version} {pipeline.name}" if pipeline.id else f"pipeline {pipeline.name}"
    )
    table = _table(title, "step", "tool", "params", "depends_on", *(["説明"] if explanations else []))
    for step in pipeline.steps:
        row = [
            step.id,
            step.tool,
            json.dumps(struct_to_dict(step.params), ensure_ascii=False),
            ", ".join(step.depends_on),
        ]
        if explanations:
            row.append(explanations.get(step.id, ""))
        table.add_row(*row)
    return table


JsonOption = typer.Option(False, "--json", help="machine-readable output (JSON; events as one JSON object a line)")
BaseOption = typer.Option("", "--base", help="edit this saved pipeline instead of starting from nothing")


@app.command()
def generate(
    instruction: str = typer.Argument(..., help="日本語の指示"),
    base: str = BaseOption,
    as_json: bool = JsonOption,
    target: str = TargetOption,
) -> None:
    """指示からパイプラインを生成して表示する（--base で保存済みパイプラインを編集）。"""
    with _connected(target) as client:
        response = client.generate(instruction, base_pipeline_id=base)
    if as_json:
        _emit_json(_message_json(response))
        return
    console.print(_pipeline_table(response.pipeline, {e.step_id: e.text for e in response.explanations}))
    console.print(f"planner: {response.planner}")
    for warning in response.warnings:
        console.print(f"[yellow]注意[/yellow] {warning}")


def _follow(
    events: Iterable[execution_pb2.ExecutionEvent], step_ids: list[str], as_json: bool = False
) -> execution_pb2.ExecutionFinished:
    """Live progress bars per step (or JSON lines); the finished event (exit 3 when the stream ends without one)."""
    finished = _json_events(events) if as_json else _follow_events(events, step_ids)
    if finished is None:
        errors.print("[red]エラー[/red] the stream ended before the execution finished")
        raise typer.Exit(code=3)
    return finished


def _json_events(events: Iterable[execution_pb2.ExecutionEvent]) -> execution_pb2.ExecutionFinished | None:
    """Each event as one JSON line, as it arrives; the finished event, or None."""
    finished = None
    for event in events:
        _emit_json(_message_json(event))
        if event.WhichOneof("kind") == "execution_finished":
            finished = event.execution_finished
    return finished


def _follow_events(
    events: Iterable[execution_pb2.ExecutionEvent], step_ids: list[str]
) -> execution_pb2.ExecutionFinished | None:
    """Live progress bars per step; the finished event, or None when the stream ended without it."""
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
    )
    known = {step: progress.add_task(step, total=1, status="待機中") for step in step_ids}
    finished: execution_pb2.ExecutionFinished | None = None
    announced = False

    class Tasks(dict[str, TaskID]):
        """A progress row per step, made on first sight (a resumed watch never saw execution_started)."""

        def __missing__(self, step: str) -> TaskID:
            self[step] = progress.add_task(step, total=1, status="待機中")
            return self[step]

    tasks = Tasks(known)
    with progress:
        for event in events:
            kind = event.WhichOneof("kind")
            if not announced:
                progress.console.print(f"実行 ID: {event.execution_id}")
                announced = True
            if kind == "execution_started":
                for step in event.execution_started.step_ids:
                    _ = tasks[step]
            elif kind == "step_started":
                progress.update(
                    tasks[event.step_started.step_id], status=f"[cyan]実行中[/cyan] (試行 {event.step_started.attempt})"
                )
            elif kind == "step_retrying":
                retry = event.step_retrying
                progress.update(tasks[retry.step_id], status=f"[yellow]再試行[/yellow] {retry.code}")
            elif kind == "step_succeeded":
                done = event.step_succeeded
                ms = done.duration.ToMilliseconds()
                found = f" 検出 {len(done.detections)}" if done.detections else ""
                progress.update(
                    tasks[done.step_id],
                    completed=1,
                    status=f"[green]完了[/green] {done.width}x{done.height} {ms} ms{found}",
                )
            elif kind == "step_failed":
                failed = event.step_failed
                progress.update(tasks[failed.step_id], status=f"[red]失敗[/red] {failed.code}: {failed.message[:60]}")
            elif kind == "step_skipped":
                progress.update(
                    tasks[event.step_skipped.step_id],
                    status=f"[magenta]スキップ[/magenta] {event.step_skipped.reason[:50]}",
                )
            elif kind == "execution_finished":
                finished = event.execution_finished
    return finished


def _detections_table(finished: execution_pb2.ExecutionFinished) -> Table | None:
    rows = [(out.step_id, det) for out in finished.outputs for det in out.detections]
    if not rows:
        return None
    table = _table("検出", "step", "label", "score", "x", "y", "width", "height")
    for step_id, det in rows:
        box = det.box
        table.add_row(
            step_id, det.label, f"{det.score:.2f}", *(f"{v:.0f}" for v in (box.x, box.y, box.width, box.height))
        )
    return table


def _write_outputs(finished: execution_pb2.ExecutionFinished, output: Path | None, as_json: bool = False) -> None:
    """Write each output image (-o), print the detections and the result; exit 1 unless it succeeded. In JSON mode
    the events were printed already; only what was written is reported, on stderr."""
    state = execution_pb2.ExecutionState.Name(finished.state).removeprefix("EXECUTION_STATE_")
    say = errors.print if as_json else console.print
    if not as_json:
        console.print(f"結果: [{STATE_STYLE.get(state, 'white')}]{state}[/] {finished.message}")
        detections = _detections_table(finished)
        if detections is not None:
            console.print(detections)
    images = [out for out in finished.outputs if out.image.data]
    if images and output is None:
        say(f"  出力画像 {len(images)} 枚は書き出していません（-o PATH で保存できます）")
    for out in images if output is not None else []:
        assert output is not None
        own = MEDIA_EXTENSION.get(out.image.media_type, ".bin")
        path = output.with_name(f"{output.stem}-{out.step_id}{own}") if len(images) > 1 else output
        asked = path.suffix.lower()
        if not asked or EXTENSION_FORMAT.get(asked, asked) != EXTENSION_FORMAT.get(own, own):  # no JPEG in a .png
            if path.suffix:
                say(f"  [yellow]注意[/yellow] 出力は {out.image.media_type} のため、拡張子を {own} にしました")
            path = path.with_suffix(own)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(out.image.data)
        say(f"  出力 {out.step_id}: {path} ({out.image.width}x{out.image.height}, {out.image.media_type})")
    if state != "SUCCEEDED":
        raise typer.Exit(code=1)


@app.command()
def run(
    instruction: str = typer.Argument(..., help="日本語の指示"),
    input_path: Path = typer.Option(..., "--input", "-i", exists=True, dir_okay=False, help="input image"),
    output: Path | None = typer.Option(None, "--output", "-o", help="output image (its extension sets the format)"),
    save: bool = typer.Option(True, help="save the generated pipeline"),
    base: str = BaseOption,
    as_json: bool = JsonOption,
    target: str = TargetOption,
) -> None:
    """指示 → 生成 → 保存 → 実行（ステップごとの進捗を表示）→ 画像を書き出す。--base で保存済みパイプラインを編集して新しいバージョンに。"""
    show = errors.print if as_json else console.print
    with _connected(target) as client:
        generated = client.generate(instruction, base_pipeline_id=base)
        wanted = EXTENSION_FORMAT.get(output.suffix.lower()) if output else None
        if wanted and not any(s.tool == "encode" for s in generated.pipeline.steps):
            edited = client.generate(f"最後に{wanted}で保存して", base_pipeline=generated.pipeline)
            edited.warnings.extend(generated.warnings)
            generated = edited
        pipeline = generated.pipeline
        if base:
            pipeline.id = base  # saved as the next version of the base
        show(_pipeline_table(pipeline, {e.step_id: e.text for e in generated.explanations}))
        for warning in generated.warnings:
            show(f"[yellow]注意[/yellow] {warning}")
        source: pipeline_pb2.Pipeline | str = pipeline
        if save:
            stored = client.save(pipeline)
            show(f"保存しました: {stored.id} v{stored.version}")
            source = stored.id
        events = client.execute(source, {"image": image_from_file(input_path)})
        finished = _follow(events, [s.id for s in pipeline.steps], as_json)
    _write_outputs(finished, output, as_json)


@app.command()
def edit(
    pipeline_id: str = typer.Argument(..., help="保存済みパイプラインの ID"),
    instruction: str = typer.Argument(..., help="変更の指示（例: 枠を青にして）"),
    as_json: bool = JsonOption,
    target: str = TargetOption,
) -> None:
    """保存済みパイプラインを指示どおりに変更し、新しいバージョンとして保存する。"""
    with _connected(target) as client:
        generated = client.generate(instruction, base_pipeline_id=pipeline_id)
        pipeline = generated.pipeline
        pipeline.id = pipeline_id
        stored = client.save(pipeline)
    if as_json:
        _emit_json(_message_json(stored))
        return
    console.print(_pipeline_table(stored, {e.step_id: e.text for e in generated.explanations}))
    for warning in generated.warnings:
        console.print(f"[yellow]注意[/yellow] {warning}")
    console.print(f"保存しました: {stored.id} v{stored.version}")


@app.command()
def execute(
    pipeline_id: str = typer.Argument(...),
    input_path: Path = typer.Option(..., "--input", "-i", exists=True, dir_okay=False),
    output: Path | None = typer.Option(None, "--output", "-o"),
    version: int = typer.Option(0, help="0 = latest"),
    request_id: str = typer.Option("", help="idempotency key"),
    as_json: bool = JsonOption,
    target: str = TargetOption,
) -> None:
    """保存済みパイプラインを実行する。"""
    with _connected(target) as client:
        pipeline = client.get(pipeline_id, version)
        events = client.execute(
            pipeline_id, {"image": image_from_file(input_path)}, version=version, request_id=request_id
        )
        finished = _follow(events, [s.id for s in pipeline.steps], as_json)
    _write_outputs(finished, output, as_json)


@app.command()
def watch(
    execution_id: str = typer.Argument(...),
    after: int = typer.Option(0, help="resume after this sequence"),
    output: Path | None = typer.Option(None, "--output", "-o"),
    as_json: bool = JsonOption,
    target: str = TargetOption,
) -> None:
    """実行の進捗を（途中から）見る。"""
    with _connected(target) as client:
        events = client.watch(execution_id, after)
        finished = _json_events(events) if as_json else _follow_events(events, [])
        if finished is None:  # --after past the last event: the execution is over, say how it ended
            execution = client.get_execution(execution_id)
            if execution.state not in TERMINAL_STATES:
                errors.print("[red]エラー[/red] the stream ended before the execution finished")
                raise typer.Exit(code=3)
            (errors.print if as_json else console.print)(
                f"--after {after} は最後のイベント（{execution.last_sequence}）より後です。実行はすでに終わっています"
            )
            finished = execution_pb2.ExecutionFinished(
                state=execution.state, outputs=execution.outputs, message=execution.message
            )
            if as_json:
                _emit_json(_message_json(execution))
    _write_outputs(finished, output, as_json)


@app.command()
def tools(as_json: bool = JsonOption, target: str = TargetOption) -> None:
    """登録済みツールの一覧。"""
    with _connected(target) as client:
        listed = client.tools()
    if as_json:
        _emit_json([_message_json(tool) for tool in listed])
        return
    table = _table("tools", "name", "version", "説明", "params", "address")
    for tool in listed:
        params = ", ".join(struct_to_dict(tool.params_schema).get("properties", {}))
        table.add_row(tool.name, tool.version, tool.description_ja, params, tool.address)
    console.print(table)


@pipelines_app.command("list")
def pipelines_list(
    page_size: int = typer.Option(50),
    page_token: str = typer.Option(""),
    stale: bool = typer.Option(False, "--stale", help="only pipelines that no longer validate (a tool changed)"),
    as_json: bool = JsonOption,
    target: str = TargetOption,
) -> None:
    """保存済みパイプラインの一覧。"""
    with _connected(target) as client:
        page = client.list_pipelines(page_size, page_token, only_stale=stale)
    if as_json:
        _emit_json(_message_json(page))
        return
    table = _table("pipelines", "id", "version", "name", "steps", "by", "updated", "")
    for item in page.pipelines:
        table.add_row(
            item.id,
            str(item.latest_version),
            item.name,
            str(item.step_count),
            item.created_by,
            item.update_time.ToDatetime().isoformat(timespec="seconds"),
            "[red]要修正[/red]" if item.stale else "",
        )
    console.print(table)
    if page.next_page_token:
        console.print(f"next page: --page-token {page.next_page_token}")


@pipelines_app.command("show")
def pipelines_show(
    pipeline_id: str,
    version: int = typer.Option(0),
    as_json: bool = JsonOption,
    target: str = TargetOption,
) -> None:
    """パイプラインを表示する（今のツールで検証できない箇所も）。"""
    with _connected(target) as client:
        pipeline = client.get(pipeline_id, version)
        violations = client.violations(pipeline_id, version)
    if as_json:
        _emit_json({**_message_json(pipeline), "violations": [{"field": f, "description": d} for f, d in violations]})
        return
    console.print(_pipeline_table(pipeline))
    for field, description in violations:
        console.print(f"[red]検証エラー[/red] {field}: {description}")


@pipelines_app.command("rm")
def pipelines_rm(pipeline_id: str, as_json: bool = JsonOption, target: str = TargetOption) -> None:
    """パイプラインを（全バージョン）削除する。"""
    with _connected(target) as client:
        count = client.delete(pipeline_id)
    if as_json:
        _emit_json({"pipeline_id": pipeline_id, "deleted_versions": count})
        return
    console.print(f"削除しました: {pipeline_id}（{count} バージョン）")


if __name__ == "__main__":
    app()
