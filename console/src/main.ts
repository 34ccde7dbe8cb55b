// ImageFlow web console: type Japanese, see the pipeline as a graph, edit params (validated live), run it and watch
// each step over the ExecutePipeline server stream, save, edit conversationally, browse saved pipelines and runs.
// Everything is gRPC-Web (Connect's grpc-web transport) through Envoy to the unchanged grpc.aio server.
import { create, type JsonObject } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { ExecutionState, type ExecutionEvent, type StepOutput } from "./gen/imageflow/v1/execution_pb";
import { type Pipeline, PipelineSchema } from "./gen/imageflow/v1/pipeline_pb";
import { PipelineService } from "./gen/imageflow/v1/pipeline_service_pb";

const $ = <T extends HTMLElement>(id: string): T => document.getElementById(id) as T;

const tokenInput = $<HTMLInputElement>("token");
tokenInput.value = localStorage.getItem("imageflow.token") ?? "";
tokenInput.addEventListener("change", () => localStorage.setItem("imageflow.token", tokenInput.value.trim()));

const withToken: Interceptor = (next) => async (request) => {
  const token = tokenInput.value.trim();
  if (token) request.header.set("authorization", `Bearer ${token}`);
  return next(request);
};
const client = createClient(
  PipelineService,
  createGrpcWebTransport({ baseUrl: location.origin, interceptors: [withToken] }),
);

type StepState = "pending" | "running" | "done" | "failed" | "skipped";

interface Draft {
  pipeline: Pipeline;
  explanations: Map<string, string>;
}

let draft: Draft | null = null;
let image: Uint8Array | null = null;
const stepWidths = new Map<string, [number, number]>();

// --- messages -------------------------------------------------------------------------------------------------------

function say(text: string, kind: "info" | "error" = "info"): void {
  const box = $("message");
  box.textContent = text;
  box.className = kind;
}

function describe(error: unknown): string {
  if (error instanceof ConnectError) {
    const names: Partial<Record<Code, string>> = {
      [Code.Unauthenticated]: "認証が必要です（トークンを入力してください）",
      [Code.PermissionDenied]: "この操作の権限がありません",
      [Code.InvalidArgument]: "入力を確認してください",
      [Code.Unavailable]: "サーバーに接続できません",
    };
    return `${names[error.code] ?? Code[error.code]}: ${error.rawMessage}`;
  }
  return String(error);
}

// --- the graph ------------------------------------------------------------------------------------------------------

function depths(pipeline: Pipeline): Map<string, number> {
  const depth = new Map<string, number>();
  const byId = new Map(pipeline.steps.map((s) => [s.id, s]));
  const visit = (id: string): number => {
    if (depth.has(id)) return depth.get(id)!;
    const step = byId.get(id);
    const d = step && step.dependsOn.length ? 1 + Math.max(...step.dependsOn.map(visit)) : 0;
    depth.set(id, d);
    return d;
  };
  pipeline.steps.forEach((s) => visit(s.id));
  return depth;
}

function renderGraph(pipeline: Pipeline): void {
  const svg = $("graph");
  const depth = depths(pipeline);
  const columns = new Map<number, string[]>();
  pipeline.steps.forEach((s) => columns.set(depth.get(s.id)!, [...(columns.get(depth.get(s.id)!) ?? []), s.id]));
  const width = 170, height = 56, gapX = 60, gapY = 24;
  const at = new Map<string, [number, number]>();
  for (const [d, ids] of columns) ids.forEach((id, i) => at.set(id, [20 + d * (width + gapX), 20 + i * (height + gapY)]));
  const maxX = Math.max(...[...at.values()].map(([x]) => x)) + width + 20;
  const maxY = Math.max(...[...at.values()].map(([, y]) => y)) + height + 20;
  svg.setAttribute("viewBox", `0 0 ${maxX} ${maxY}`);
  svg.setAttribute("width", String(maxX));
  svg.setAttribute("height", String(maxY));
  const edges = pipeline.steps.flatMap((s) =>
    s.dependsOn.map((from) => {
      const [x1, y1] = at.get(from)!, [x2, y2] = at.get(s.id)!;
      return `<line x1="${x1 + width}" y1="${y1 + height / 2}" x2="${x2}" y2="${y2 + height / 2}" marker-end="url(#arrow)"/>`;
    }),
  );
  const nodes = pipeline.steps.map((s) => {
    const [x, y] = at.get(s.id)!;
    return `<g class="node" data-step="${esc(s.id)}" data-state="pending" transform="translate(${x},${y})">
      <rect width="${width}" height="${height}" rx="8"/>
      <text x="10" y="22" class="tool">${esc(s.tool)}</text>
      <text x="10" y="42" class="id">${esc(s.id)}</text></g>`;
  });
  svg.innerHTML = `<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" markerHeight="8"
    orient="auto"><path d="M0,0 L10,5 L0,10 z"/></marker></defs>${edges.join("")}${nodes.join("")}`;
}

function esc(text: string): string {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

// --- the step list: explanation, params (editable, validated live) ---------------------------------------------------

let validateTimer: number | undefined;

function renderSteps(d: Draft): void {
  const list = $("steps");
  list.innerHTML = "";
  d.pipeline.steps.forEach((step, index) => {
    const item = document.createElement("li");
    item.className = "step";
    item.dataset.step = step.id;
    item.dataset.state = "pending";
    item.innerHTML = `<div class="head"><span class="state"></span><b>${esc(step.id)}</b> <code>${esc(step.tool)}</code>
      <span class="after">${step.dependsOn.length ? "← " + step.dependsOn.map(esc).join(", ") : ""}</span></div>
      <p class="explanation">${esc(d.explanations.get(step.id) ?? "")}</p>
      <textarea class="params" spellcheck="false" aria-label="${esc(step.id)} のパラメータ"></textarea>
      <div class="violations"></div>`;
    const params = item.querySelector("textarea")!;
    params.value = JSON.stringify(step.params ?? {}, null, 1);
    params.addEventListener("input", () => {
      window.clearTimeout(validateTimer);
      validateTimer = window.setTimeout(() => void applyParams(index, params, item), 300);
    });
    list.appendChild(item);
  });
}

async function applyParams(index: number, area: HTMLTextAreaElement, item: HTMLElement): Promise<void> {
  if (!draft) return;
  const box = item.querySelector(".violations")!;
  let parsed: JsonObject;
  try {
    parsed = JSON.parse(area.value || "{}");
  } catch {
    box.textContent = "JSON として読めません";
    item.classList.add("invalid");
    return;
  }
  draft.pipeline.steps[index].params = parsed;
  await validate();
}

async function validate(): Promise<boolean> {
  if (!draft) return false;
  document.querySelectorAll<HTMLElement>("li.step").forEach((li) => {
    li.classList.remove("invalid");
    li.querySelector(".violations")!.textContent = "";
  });
  try {
    const response = await client.validatePipeline({ pipeline: draft.pipeline });
    draft.pipeline.steps.forEach((s, i) => (s.dependsOn = response.pipeline!.steps[i].dependsOn));
    $("validity").textContent = "✓ 検証済み";
    $("validity").className = "ok";
    return true;
  } catch (error) {
    $("validity").textContent = "✗ 修正が必要です";
    $("validity").className = "bad";
    const details = error instanceof ConnectError ? error.rawMessage : String(error);
    for (const part of details.replace(/^invalid pipeline: /, "").split("; ")) {
      const match = /^steps\[(\d+)\]/.exec(part);
      const li = match ? document.querySelectorAll<HTMLElement>("li.step")[Number(match[1])] : undefined;
      if (li) {
        li.classList.add("invalid");
        li.querySelector(".violations")!.textContent += part + "\n";
      } else say(part, "error");
    }
    return false;
  }
}

function show(d: Draft): void {
  draft = d;
  $("pipeline-title").textContent = d.pipeline.id
    ? `${d.pipeline.name}（${d.pipeline.id} v${d.pipeline.version}）`
    : `${d.pipeline.name}（未保存）`;
  $("editing").hidden = !d.pipeline.id;
  $<HTMLInputElement>("use-base").checked = Boolean(d.pipeline.id);
  renderGraph(d.pipeline);
  renderSteps(d);
  $("workspace").hidden = false;
  $<HTMLButtonElement>("run").disabled = !image;
  void validate();
}

// --- generate, save, edit -------------------------------------------------------------------------------------------

$("generate-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const instruction = $<HTMLTextAreaElement>("instruction").value.trim();
  if (!instruction) return say("指示を入力してください", "error");
  const base = $<HTMLInputElement>("use-base").checked && draft?.pipeline.id ? draft.pipeline : undefined;
  say("生成しています…");
  try {
    const response = await client.generatePipeline(
      base ? { instruction, base: { case: "basePipelineId", value: base.id } } : { instruction },
    );
    const pipeline = response.pipeline!;
    if (base) pipeline.id = base.id; // saving makes it the next version of the base
    show({ pipeline, explanations: new Map(response.explanations.map((e) => [e.stepId, e.text])) });
    say(response.warnings.length ? `注意: ${response.warnings.join(" / ")}` : `生成しました（${response.planner}）`);
  } catch (error) {
    say(describe(error), "error");
  }
});

$("save").addEventListener("click", async () => {
  if (!draft || !(await validate())) return;
  try {
    const response = await client.savePipeline({ pipeline: draft.pipeline });
    show({ pipeline: response.pipeline!, explanations: draft.explanations });
    say(`保存しました: ${response.pipelineId} v${response.version}`);
    await refreshSaved();
  } catch (error) {
    say(describe(error), "error");
  }
});

// --- image ----------------------------------------------------------------------------------------------------------

async function takeImage(file: File): Promise<void> {
  image = new Uint8Array(await file.arrayBuffer());
  const preview = $<HTMLImageElement>("input-preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop").classList.add("has-image");
  $<HTMLButtonElement>("run").disabled = !draft;
}

$<HTMLInputElement>("file").addEventListener("change", (event) => {
  const file = (event.target as HTMLInputElement).files?.[0];
  if (file) void takeImage(file);
});
const drop = $("drop");
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  const file = event.dataTransfer?.files[0];
  if (file) void takeImage(file);
});

// --- run and watch --------------------------------------------------------------------------------------------------

function setState(stepId: string, state: StepState, note = ""): void {
  document.querySelectorAll<HTMLElement>(`[data-step="${CSS.escape(stepId)}"]`).forEach((el) => {
    el.dataset.state = state;
    const label = el.querySelector(".state");
    if (label) label.textContent = { pending: "待機", running: "実行中", done: "完了", failed: "失敗", skipped: "スキップ" }[state] + note;
  });
}

function resetRun(): void {
  document.querySelectorAll<HTMLElement>("[data-step]").forEach((el) => setState(el.dataset.step!, "pending"));
  $("outputs").innerHTML = "";
  $("detections").innerHTML = "";
  stepWidths.clear();
}

async function follow(
  events: AsyncIterable<{ event?: ExecutionEvent }>,
  pipelineName: string,
  record = true,
): Promise<void> {
  const status = $("run-status");
  status.dataset.state = "running";
  status.textContent = "実行中…";
  for await (const { event } of events) {
    if (!event) continue;
    const kind = event.kind;
    switch (kind.case) {
      case "executionStarted":
        $("execution-id").textContent = event.executionId;
        if (record) remember(event.executionId, pipelineName);
        kind.value.stepIds.forEach((id) => setState(id, "pending"));
        break;
      case "stepStarted":
        setState(kind.value.stepId, "running");
        break;
      case "stepRetrying":
        setState(kind.value.stepId, "running", `（再試行 ${kind.value.code}）`);
        break;
      case "stepSucceeded":
        stepWidths.set(kind.value.stepId, [kind.value.width, kind.value.height]);
        setState(kind.value.stepId, "done", ` ${milliseconds(kind.value.duration)} ms`);
        break;
      case "stepFailed":
        setState(kind.value.stepId, "failed", ` ${kind.value.code}: ${kind.value.message}`);
        break;
      case "stepSkipped":
        setState(kind.value.stepId, "skipped");
        break;
      case "executionFinished": {
        const state = ExecutionState[kind.value.state];
        status.dataset.state = state === "SUCCEEDED" ? "succeeded" : "failed";
        status.textContent = { SUCCEEDED: "完了しました", FAILED: "失敗しました", CANCELLED: "取り消されました", PARTIALLY_SUCCEEDED: "一部完了" }[state] ?? state;
        if (kind.value.message) status.textContent += `: ${kind.value.message}`;
        await readLeftOut(event.executionId, kind.value.outputs);
        showOutputs(kind.value.outputs);
        break;
      }
    }
  }
}

/** Output images the server left out of the finished event (too large for one message): read apart, in pieces. */
async function readLeftOut(executionId: string, outputs: StepOutput[]): Promise<void> {
  for (const output of outputs) {
    const image = output.image;
    if (!image || image.data.length || !image.dataBytes || !image.blobRef) continue;
    const data = new Uint8Array(Number(image.dataBytes));
    let at = 0;
    try {
      for await (const reply of client.readExecutionOutput({ executionId, blobRef: image.blobRef })) {
        data.set(reply.data, at);
        at += reply.data.length;
      }
    } catch (error) {
      // dropped after the server's retention: nothing to show for it
      if (error instanceof ConnectError && error.code === Code.NotFound) continue;
      throw error;
    }
    if (at !== data.length) throw new Error(`${output.stepId}: ${at} / ${data.length} バイトしか届きませんでした`);
    image.data = data;
  }
}

function milliseconds(duration?: { seconds: bigint; nanos: number }): number {
  return duration ? Math.round(Number(duration.seconds) * 1000 + duration.nanos / 1e6) : 0;
}

function showOutputs(outputs: StepOutput[]): void {
  const box = $("outputs");
  const rows: string[] = [];
  const allDetections = outputs.flatMap((o) => o.detections.map((d) => ({ step: o.stepId, d })));
  for (const output of outputs) {
    if (!output.image?.data.length) continue;
    const figure = document.createElement("figure");
    const canvas = document.createElement("canvas");
    canvas.className = "output";
    canvas.dataset.step = `output-${output.stepId}`;
    const picture = new Image();
    picture.onload = () => {
      canvas.width = picture.naturalWidth;
      canvas.height = picture.naturalHeight;
      const ctx = canvas.getContext("2d")!;
      ctx.drawImage(picture, 0, 0);
      ctx.lineWidth = Math.max(2, canvas.width / 300);
      ctx.strokeStyle = "#00e0ff";
      ctx.font = `${Math.max(12, canvas.width / 40)}px sans-serif`;
      ctx.fillStyle = "#00e0ff";
      for (const { step, d } of allDetections) {
        const [w, h] = stepWidths.get(step) ?? [canvas.width, canvas.height];
        const sx = canvas.width / w, sy = canvas.height / h;
        const b = d.box!;
        ctx.strokeRect(b.x * sx, b.y * sy, b.width * sx, b.height * sy);
        ctx.fillText(`${d.label} ${d.score.toFixed(2)}`, b.x * sx + 4, b.y * sy + 16);
      }
      canvas.dataset.loaded = "true";
    };
    picture.src = URL.createObjectURL(new Blob([output.image.data], { type: output.image.mediaType }));
    const caption = document.createElement("figcaption");
    caption.textContent = `${output.stepId}: ${output.image.width}×${output.image.height} ${output.image.mediaType}`;
    const link = document.createElement("a");
    link.textContent = "保存";
    link.download = `${output.stepId}.${output.image.mediaType.split("/")[1] ?? "bin"}`;
    link.href = picture.src;
    caption.append(" ", link);
    figure.append(canvas, caption);
    box.appendChild(figure);
  }
  for (const { step, d } of allDetections) {
    const b = d.box!;
    rows.push(`<tr><td>${esc(step)}</td><td>${esc(d.label)}</td><td>${d.score.toFixed(2)}</td>
      <td>${Math.round(b.x)}, ${Math.round(b.y)}, ${Math.round(b.width)}×${Math.round(b.height)}</td></tr>`);
  }
  $("detections").innerHTML = rows.length
    ? `<table><thead><tr><th>ステップ</th><th>ラベル</th><th>スコア</th><th>位置</th></tr></thead><tbody>${rows.join("")}</tbody></table>`
    : "";
}

$("run").addEventListener("click", async () => {
  if (!draft || !image || !(await validate())) return;
  resetRun();
  const source = draft.pipeline.id
    ? { case: "pipelineId" as const, value: draft.pipeline.id }
    : { case: "pipeline" as const, value: create(PipelineSchema, draft.pipeline) };
  try {
    await follow(client.executePipeline({ source, inputs: { image: { data: image } } }), draft.pipeline.name);
  } catch (error) {
    $("run-status").dataset.state = "failed";
    $("run-status").textContent = describe(error);
  }
});

// --- saved pipelines and past executions ----------------------------------------------------------------------------

async function refreshSaved(): Promise<void> {
  const list = $("saved");
  try {
    const page = await client.listPipelines({ pageSize: 100 });
    list.innerHTML = "";
    for (const p of page.pipelines) {
      const item = document.createElement("li");
      item.dataset.pipeline = p.id;
      item.innerHTML = `<button type="button">${esc(p.name)}</button> <small>${esc(p.id)} v${p.latestVersion} · ${p.stepCount} ステップ${p.stale ? " · <b>要修正</b>" : ""}</small>`;
      item.querySelector("button")!.addEventListener("click", () => void load(p.id));
      list.appendChild(item);
    }
  } catch (error) {
    list.innerHTML = `<li class="error">${esc(describe(error))}</li>`;
  }
}

async function load(pipelineId: string): Promise<void> {
  try {
    const response = await client.getPipeline({ pipelineId });
    show({ pipeline: response.pipeline!, explanations: new Map() });
    if (response.violations.length)
      say(`このパイプラインは今のツールでは検証できません: ${response.violations.map((v) => `${v.field}: ${v.description}`).join("; ")}`, "error");
    else say(`読み込みました: ${pipelineId}`);
  } catch (error) {
    say(describe(error), "error");
  }
}

interface Remembered {
  id: string;
  name: string;
  at: string;
}

function remember(executionId: string, name: string): void {
  const past: Remembered[] = JSON.parse(localStorage.getItem("imageflow.executions") ?? "[]");
  past.unshift({ id: executionId, name, at: new Date().toLocaleString("ja-JP") });
  localStorage.setItem("imageflow.executions", JSON.stringify(past.slice(0, 20)));
  renderPast();
}

function renderPast(): void {
  const past: Remembered[] = JSON.parse(localStorage.getItem("imageflow.executions") ?? "[]");
  const list = $("past");
  list.innerHTML = "";
  for (const run of past) {
    const item = document.createElement("li");
    item.innerHTML = `<button type="button">${esc(run.name)}</button> <small>${esc(run.at)} · ${esc(run.id)}</small>`;
    item.querySelector("button")!.addEventListener("click", async () => {
      resetRun();
      try {
        const execution = await client.getExecution({ executionId: run.id });
        if (execution.execution?.pipelineId) await load(execution.execution.pipelineId);
        resetRun();
        await follow(client.watchExecution({ executionId: run.id, afterSequence: 0n }), run.name, false);
      } catch (error) {
        say(describe(error), "error");
      }
    });
    list.appendChild(item);
  }
}

void refreshSaved();
renderPast();
