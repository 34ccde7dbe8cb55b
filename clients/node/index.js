'use strict';
// ImageFlow Node.js client: loads proto/imageflow/v1 at run time with @grpc/proto-loader.
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const MAX_MESSAGE = 512 * 1024 * 1024;
const UPLOAD_BYTES = 8 * 1024 * 1024;
const PIECE_BYTES = 64 * 1024;
const ACCEPT_WAIT_MS = 2000;
const LATE_RECHECK_MS = 300_000;

/** The events of one stream message: a batch, or the single event of a server that predates batches. */
function eventsOf(reply) {
  if (reply.events && reply.events.length) return reply.events;
  return reply.event ? [reply.event] : [];
}

function loadApi() {
  const definition = protoLoader.loadSync(
    ['imageflow/v1/pipeline_service.proto', 'imageflow/v1/tool_registry_service.proto'],
    { includeDirs: [PROTO_ROOT], keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true },
  );
  return grpc.loadPackageDefinition(definition).imageflow.v1;
}

/** A PEM given as a Buffer, or a path to read it from. */
function pem(value) {
  if (value === undefined || value === null || value === '') return null;
  return Buffer.isBuffer(value) ? value : fs.readFileSync(value);
}

/**
 * A thin promise/async-iterator wrapper over PipelineService and ToolRegistryService.
 * Options: `token` (API key or JWT, sent as `authorization: Bearer`), `tls` (use TLS with the system roots),
 * `ca` (CA certificate: Buffer or path; implies TLS), `cert` + `key` (client certificate for mTLS).
 */
class ImageflowClient {
  /** Until when uploads go without waiting for the server's acceptance (one kept a call waiting ACCEPT_WAIT_MS). */
  #lateUntil = 0;

  constructor(target = '127.0.0.1:50051', { token = '', tls = false, ca = null, cert = null, key = null } = {}) {
    const api = loadApi();
    const options = { 'grpc.max_receive_message_length': MAX_MESSAGE, 'grpc.max_send_message_length': MAX_MESSAGE };
    const secure = tls || Boolean(ca) || Boolean(cert);
    const credentials = secure
      ? grpc.credentials.createSsl(pem(ca), pem(key), pem(cert))
      : grpc.credentials.createInsecure();
    this.metadata = new grpc.Metadata();
    if (token) this.metadata.set('authorization', `Bearer ${token}`);
    this.pipelines = new api.PipelineService(target, credentials, options);
    this.registry = new api.ToolRegistryService(target, credentials, options);
  }

  #unary(client, method, request) {
    return new Promise((resolve, reject) => {
      client[method](request, this.metadata, (error, response) => (error ? reject(error) : resolve(response)));
    });
  }

  /** Japanese instruction -> { pipeline, explanations, planner, warnings }. */
  generate(instruction) {
    return this.#unary(this.pipelines, 'GeneratePipeline', { instruction });
  }

  save(pipeline) {
    return this.#unary(this.pipelines, 'SavePipeline', { pipeline });
  }

  listTools() {
    return this.#unary(this.registry, 'ListTools', {});
  }

  /**
   * Runs a saved pipeline (id string) or an inline one; yields ExecutionEvent objects as they stream in. It asks
   * for `batch_events` (the events that are ready come in one message) and still yields them one by one; a server
   * that predates batches sends one event per message, which works the same. An image over `uploadAbove` bytes
   * (8 MiB) goes by ExecutePipelineUpload, in 64 KiB pieces, so the server holds it once; a server that predates
   * the upload answers UNIMPLEMENTED and gets it in one message instead.
   */
  async *execute(pipeline, imageBytes, { requestId = '', uploadAbove = UPLOAD_BYTES } = {}) {
    const request = { inputs: { image: { data: imageBytes } }, request_id: requestId, batch_events: true };
    if (typeof pipeline === 'string') request.pipeline_id = pipeline;
    else request.pipeline = pipeline;
    let replies = null;
    if (imageBytes.length > uploadAbove) {
      replies = this.#upload(request, imageBytes);
      let first;
      try {
        first = await replies.next();
      } catch (error) {
        if (error.code !== grpc.status.UNIMPLEMENTED) throw error;
        replies = null;
      }
      if (replies !== null) {
        if (!first.done) yield* this.#complete(first.value);
        for await (const reply of replies) yield* this.#complete(reply);
        return;
      }
    }
    for await (const reply of this.pipelines.ExecutePipeline(request, this.metadata)) yield* this.#complete(reply);
  }

  /** A stream message's events, each finished one with the output images the server left out (too large for one
   * message: `data_bytes` set, `data` empty) read in and `data_bytes` cleared. */
  async *#complete(reply) {
    for (const event of eventsOf(reply)) {
      for (const output of event.execution_finished?.outputs ?? []) {
        const image = output.image;
        if (image && Number(image.data_bytes) > 0 && !image.data?.length && image.blob_ref) {
          try {
            image.data = await this.readOutput(event.execution_id, image.blob_ref);
          } catch (error) {
            // dropped after the server's retention: the event still comes, saying so as the server does
            if (error.code !== grpc.status.NOT_FOUND) throw error;
          }
          image.data_bytes = 0;
        }
      }
      yield event;
    }
  }

  /** An output image's bytes by its `blob_ref`, read in pieces (ReadExecutionOutput): for an image the server left
   * out of a message, or any output while the server retains it. */
  async readOutput(executionId, blobRef) {
    const pieces = [];
    let length = null;
    const request = { execution_id: executionId, blob_ref: blobRef };
    for await (const reply of this.pipelines.ReadExecutionOutput(request, this.metadata)) {
      if (length === null) length = Number(reply.data_bytes);
      pieces.push(reply.data);
    }
    const data = Buffer.concat(pieces);
    if (length !== null && data.length !== length) {
      throw Object.assign(new Error(`output ${blobRef}: the stream ended at byte ${data.length} of ${length}`), {
        code: grpc.status.DATA_LOSS,
      });
    }
    return data;
  }

  /**
   * ExecutePipelineUpload: the head (the request without the image's data, and its length), then the pieces. To a
   * server whose initial metadata says it answers (`imageflow-go-ahead: 1`, waited for at most 2 s) the head asks for
   * a go-ahead and the pieces go only once it comes: a refused head costs no upload.
   */
  async *#upload(request, imageBytes) {
    const call = this.pipelines.ExecutePipelineUpload(this.metadata);
    const head = { ...request, inputs: { image: {} } };
    // a server that does not accept first (metadata before reading) gets the pieces at once, for LATE_RECHECK_MS
    const offered =
      Date.now() < this.#lateUntil
        ? Promise.resolve(false)
        : new Promise((resolve) => {
            const timer = setTimeout(() => {
              this.#lateUntil = Date.now() + LATE_RECHECK_MS;
              resolve(false);
            }, ACCEPT_WAIT_MS);
            timer.unref();
            call.once('metadata', (metadata) => {
              clearTimeout(timer);
              resolve(metadata.get('imageflow-go-ahead')[0] === '1');
            });
            call.once('status', () => {
              clearTimeout(timer);
              resolve(false);
            });
          });
    let answer = () => {};
    const answered = new Promise((resolve) => {
      answer = resolve;
    });
    let asks = false;
    const sending = (async () => {
      const send = (message) => (call.write(message) ? null : new Promise((resolve) => call.once('drain', resolve)));
      asks = await offered;
      await send({ head, input_bytes: { image: imageBytes.length }, await_go_ahead: asks });
      if (asks && !(await answered)) return; // refused: the call has ended with the reason, which the reader raises
      for (let start = 0; start < imageBytes.length; start += PIECE_BYTES) {
        await send({ piece: { input: 'image', data: imageBytes.subarray(start, start + PIECE_BYTES) } });
      }
      call.end();
    })();
    sending.catch(() => {}); // a refused call ends the stream with the error, which the reader below raises
    try {
      let first = true;
      for await (const reply of call) {
        if (reply.go_ahead) answer(true);
        else if (first && asks) {
          call.cancel();
          throw Object.assign(new Error('the server offered a go-ahead for the upload and answered its head with something else'), {
            code: grpc.status.INTERNAL,
          });
        } else yield reply;
        first = false;
      }
    } finally {
      answer(false);
    }
  }

  close() {
    this.pipelines.close();
    this.registry.close();
  }
}

module.exports = { ImageflowClient, grpc, UPLOAD_BYTES };
