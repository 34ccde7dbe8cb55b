'use strict';
// ImageFlow Node.js client: loads proto/imageflow/v1 at run time with @grpc/proto-loader.
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const MAX_MESSAGE = 512 * 1024 * 1024;

function loadApi() {
  const definition = protoLoader.loadSync(
    ['imageflow/v1/pipeline_service.proto', 'imageflow/v1/tool_registry_service.proto'],
    { includeDirs: [PROTO_ROOT], keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true },
  );
  return grpc.loadPackageDefinition(definition).imageflow.v1;
}

/** A thin promise/async-iterator wrapper over PipelineService and ToolRegistryService. */
class ImageflowClient {
  constructor(target = '127.0.0.1:50051') {
    const api = loadApi();
    const options = { 'grpc.max_receive_message_length': MAX_MESSAGE, 'grpc.max_send_message_length': MAX_MESSAGE };
    const credentials = grpc.credentials.createInsecure();
    this.pipelines = new api.PipelineService(target, credentials, options);
    this.registry = new api.ToolRegistryService(target, credentials, options);
  }

  static #unary(client, method, request) {
    return new Promise((resolve, reject) => {
      client[method](request, (error, response) => (error ? reject(error) : resolve(response)));
    });
  }

  /** Japanese instruction -> { pipeline, explanations, planner, warnings }. */
  generate(instruction) {
    return ImageflowClient.#unary(this.pipelines, 'GeneratePipeline', { instruction });
  }

  save(pipeline) {
    return ImageflowClient.#unary(this.pipelines, 'SavePipeline', { pipeline });
  }

  listTools() {
    return ImageflowClient.#unary(this.registry, 'ListTools', {});
  }

  /** Runs a saved pipeline (id string) or an inline one; yields ExecutionEvent objects as they stream in. */
  async *execute(pipeline, imageBytes, { requestId = '' } = {}) {
    const request = { inputs: { image: { data: imageBytes } }, request_id: requestId };
    if (typeof pipeline === 'string') request.pipeline_id = pipeline;
    else request.pipeline = pipeline;
    const call = this.pipelines.ExecutePipeline(request);
    for await (const reply of call) yield reply.event;
  }

  close() {
    this.pipelines.close();
    this.registry.close();
  }
}

module.exports = { ImageflowClient, grpc };
