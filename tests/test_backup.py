"""Backups as the README documents them, round trip: pg_dump/pg_restore for PostgreSQL, SQLite's online backup API
while the server runs. Pipelines and their versions, tools, executions and their output images all come back."""

from __future__ import annotations

import sqlite3
import subprocess
import uuid
from pathlib import Path

import asyncpg
from imageflow.server.app import start_control_plane
from imageflow.server.settings import Settings
from imageflow.v1 import execution_pb2, image_pb2, pipeline_pb2, pipeline_service_pb2, pipeline_service_pb2_grpc

from tests.conftest import _pg_bin, aio_channel, sample


async def _fill(address: str) -> tuple[str, str]:
    """A pipeline with two versions and one execution with an output image; returns their ids."""
    async with aio_channel(address) as channel:
        stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
        pipeline = pipeline_pb2.Pipeline(name="backup me")
        pipeline.steps.add(id="gray", tool="grayscale")
        saved = await stub.SavePipeline(pipeline_service_pb2.SavePipelineRequest(pipeline=pipeline))
        pipeline.id = saved.pipeline_id
        pipeline.steps.add(id="flip", tool="flip", depends_on=["gray"]).params.update({"direction": "vertical"})
        await stub.SavePipeline(pipeline_service_pb2.SavePipelineRequest(pipeline=pipeline))
        request = pipeline_service_pb2.ExecutePipelineRequest(
            pipeline_id=saved.pipeline_id, inputs={"image": image_pb2.Image(data=sample("chelsea.jpg"))}
        )
        events = [r.event async for r in stub.ExecutePipeline(request)]
        return saved.pipeline_id, events[0].execution_id


async def _check(address: str, pipeline_id: str, execution_id: str) -> None:
    async with aio_channel(address) as channel:
        stub = pipeline_service_pb2_grpc.PipelineServiceStub(channel)
        latest = await stub.GetPipeline(pipeline_service_pb2.GetPipelineRequest(pipeline_id=pipeline_id))
        first = await stub.GetPipeline(pipeline_service_pb2.GetPipelineRequest(pipeline_id=pipeline_id, version=1))
        assert (latest.pipeline.version, len(latest.pipeline.steps), len(first.pipeline.steps)) == (2, 2, 1)
        got = await stub.GetExecution(pipeline_service_pb2.GetExecutionRequest(execution_id=execution_id))
        (output,) = got.execution.outputs
        assert output.image.data[:3] == b"\xff\xd8\xff"  # the output image came back too
        assert got.execution.state == execution_pb2.EXECUTION_STATE_SUCCEEDED


async def test_sqlite_online_backup_round_trip(tmp_path: Path) -> None:
    live, copy = tmp_path / "live.db", tmp_path / "backup.db"
    plane = await start_control_plane(Settings(host="127.0.0.1", port=0, database_url=f"sqlite:///{live}"))
    try:
        ids = await _fill(plane.address)
        with sqlite3.connect(live) as source, sqlite3.connect(copy) as target:  # while the server runs
            source.backup(target)
    finally:
        await plane.stop(0.5)
    restored = await start_control_plane(Settings(host="127.0.0.1", port=0, database_url=f"sqlite:///{copy}"))
    try:
        await _check(restored.address, *ids)
        assert "grayscale" in {t.name for t in restored.registry.list()}
    finally:
        await restored.stop(0.5)


async def test_pg_dump_and_pg_restore_round_trip(postgres_url: str, tmp_path: Path) -> None:
    source_db, target_db = f"src_{uuid.uuid4().hex[:8]}", f"dst_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute(f"CREATE DATABASE {source_db}")
        await admin.execute(f"CREATE DATABASE {target_db}")
    finally:
        await admin.close()
    base = postgres_url.rsplit("/", 1)[0]
    plane = await start_control_plane(Settings(host="127.0.0.1", port=0, database_url=f"{base}/{source_db}"))
    try:
        ids = await _fill(plane.address)
    finally:
        await plane.stop(0.5)
    dump = tmp_path / "imageflow.dump"
    subprocess.run([_pg_bin("pg_dump"), "-Fc", "-f", str(dump), f"{base}/{source_db}"], check=True, capture_output=True)
    subprocess.run(
        [_pg_bin("pg_restore"), "--no-owner", "-d", f"{base}/{target_db}", str(dump)], check=True, capture_output=True
    )
    restored = await start_control_plane(Settings(host="127.0.0.1", port=0, database_url=f"{base}/{target_db}"))
    try:
        await _check(restored.address, *ids)
        assert "grayscale" in {t.name for t in restored.registry.list()}
    finally:
        await restored.stop(0.5)
