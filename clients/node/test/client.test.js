'use strict';
// Runs against a live control plane: IMAGEFLOW_TARGET (the Python test suite starts one and runs this file).
const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const path = require('node:path');
const { ImageflowClient, grpc } = require('..');

const target = process.env.IMAGEFLOW_TARGET;
const smallTarget = process.env.IMAGEFLOW_SMALL_MESSAGES_TARGET;
// TLS / mTLS and a token when the suite's server asks for them.
const connection = {
  token: process.env.IMAGEFLOW_TOKEN || '',
  ca: process.env.IMAGEFLOW_CA_FILE || null,
  cert: process.env.IMAGEFLOW_CLIENT_CERT_FILE || null,
  key: process.env.IMAGEFLOW_CLIENT_KEY_FILE || null,
};
const sample = fs.readFileSync(path.resolve(__dirname, '..', '..', '..', 'samples', 'chelsea.jpg'));

test('generate returns a validated pipeline with depends_on', { skip: !target }, async () => {
  const client = new ImageflowClient(target, connection);
  try {
    const response = await client.generate('猫を検出して赤い枠で囲んで');
    assert.deepEqual(response.pipeline.steps.map((s) => s.tool), ['detect', 'draw_boxes']);
    assert.deepEqual(response.pipeline.steps[1].depends_on, ['detect']);
    assert.equal(response.planner, 'offline');
  } finally {
    client.close();
  }
});

test('execute streams ordered events and the output image', { skip: !target }, async () => {
  const client = new ImageflowClient(target, connection);
  try {
    const { pipeline } = await client.generate('猫を検出して赤い枠で囲んで');
    const events = [];
    for await (const event of client.execute(pipeline, sample)) events.push(event);
    assert.deepEqual(events.map((e) => Number(e.sequence)), events.map((_, i) => i + 1));
    assert.equal(events[0].kind, 'execution_started');
    const finished = events.at(-1);
    assert.equal(finished.kind, 'execution_finished');
    assert.equal(finished.execution_finished.state, 'EXECUTION_STATE_SUCCEEDED');
    const output = finished.execution_finished.outputs[0];
    assert.equal(output.image.media_type, 'image/jpeg');
    assert.equal(output.image.width, 451);
    assert.ok(Buffer.from(output.image.data).subarray(0, 3).equals(Buffer.from([0xff, 0xd8, 0xff])));
  } finally {
    client.close();
  }
});

test('execute asks for batches and yields the same events as one per message', { skip: !target }, async () => {
  const client = new ImageflowClient(target, connection);
  try {
    const steps = ['horizontal', 'vertical', 'horizontal', 'vertical'].map((direction, i) => ({
      id: `f${i}`, tool: 'flip', params: { fields: { direction: { stringValue: direction } } }, depends_on: i ? [`f${i - 1}`] : [],
    }));
    const pipeline = { name: 'node-batches', steps };
    const events = [];
    for await (const event of client.execute(pipeline, sample)) events.push(event);
    const raw = (batch) => new Promise((resolve, reject) => {
      const replies = [];
      const call = client.pipelines.ExecutePipeline(
        { pipeline, inputs: { image: { data: sample } }, batch_events: batch }, client.metadata,
      );
      call.on('data', (reply) => replies.push(reply));
      call.on('error', reject);
      call.on('end', () => resolve(replies));
    });
    const single = await raw(false);
    const batched = await raw(true);
    const kinds = (list) => list.map((e) => `${e.kind}:${e[e.kind].step_id || ''}`);
    assert.deepEqual(events.map((e) => Number(e.sequence)), events.map((_, i) => i + 1));
    assert.deepEqual(kinds(events), kinds(single.map((r) => r.event)));  // same events, same order
    assert.equal(events.length, 2 + 2 * steps.length);
    assert.ok(batched.length < events.length);  // the server grouped them: fewer messages than events
    assert.deepEqual(kinds(batched.flatMap((r) => r.events)), kinds(events));
  } finally {
    client.close();
  }
});

test('an image uploaded in pieces runs like one sent whole', { skip: !target }, async () => {
  const client = new ImageflowClient(target, connection);
  try {
    const pipeline = {
      name: 'node-upload',
      steps: [{ id: 'mirror', tool: 'flip', params: { fields: { direction: { stringValue: 'horizontal' } } } }],
    };
    const run = async (options) => {
      const events = [];
      for await (const event of client.execute(pipeline, sample, options)) events.push(event);
      return events;
    };
    const whole = await run({});
    const uploaded = await run({ uploadAbove: 0 }); // every image goes by ExecutePipelineUpload
    assert.deepEqual(uploaded.map((e) => e.kind), whole.map((e) => e.kind));
    const image = (events) => Buffer.from(events.at(-1).execution_finished.outputs[0].image.data);
    assert.equal(uploaded.at(-1).execution_finished.state, 'EXECUTION_STATE_SUCCEEDED');
    assert.ok(image(uploaded).equals(image(whole)));
    assert.ok(image(whole).length > 1000);
  } finally {
    client.close();
  }
});

test('a server that predates the upload gets the image in one message', async () => {
  // A grpc-js server with ExecutePipeline alone: the upload method answers UNIMPLEMENTED there.
  const protoLoader = require('@grpc/proto-loader');
  const definition = protoLoader.loadSync(['imageflow/v1/pipeline_service.proto'], {
    includeDirs: [path.resolve(__dirname, '..', '..', '..', 'proto')], keepCase: true, longs: Number, enums: String,
    defaults: true, oneofs: true,
  });
  const api = grpc.loadPackageDefinition(definition).imageflow.v1;
  const server = new grpc.Server();
  const received = [];
  server.addService(api.PipelineService.service, {
    ExecutePipeline: (call) => {
      received.push(call.request.inputs.image.data.length);
      call.write({ events: [{ sequence: 1, execution_finished: { state: 'EXECUTION_STATE_SUCCEEDED' } }] });
      call.end();
    },
  });
  const port = await new Promise((resolve, reject) => {
    server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (error, bound) => (error ? reject(error) : resolve(bound)));
  });
  const client = new ImageflowClient(`127.0.0.1:${port}`);
  try {
    const events = [];
    for await (const event of client.execute({ name: 'p', steps: [] }, sample, { uploadAbove: 0 })) events.push(event);
    assert.deepEqual(events.map((e) => e.kind), ['execution_finished']);
    assert.deepEqual(received, [sample.length]);
  } finally {
    client.close();
    server.forceShutdown();
  }
});

test('a refusal is INVALID_ARGUMENT with a Japanese message', { skip: !target }, async () => {
  const client = new ImageflowClient(target, connection);
  try {
    await assert.rejects(client.generate('明日の天気を教えて'), (error) => {
      assert.equal(error.code, grpc.status.INVALID_ARGUMENT);
      assert.match(error.details, /画像処理/);
      return true;
    });
  } finally {
    client.close();
  }
});

test('a call without the token is UNAUTHENTICATED when the server requires one', { skip: !target || !connection.token }, async () => {
  const client = new ImageflowClient(target, { ...connection, token: '' });
  try {
    await assert.rejects(client.listTools(), (error) => {
      assert.equal(error.code, grpc.status.UNAUTHENTICATED);
      return true;
    });
  } finally {
    client.close();
  }
});

test('an output too large for one message arrives whole, read in pieces', { skip: !smallTarget }, async () => {
  // IMAGEFLOW_SMALL_MESSAGES_TARGET: a control plane whose message limit is 1 MiB; a 1536x1536 PNG is about 1.9 MB
  const client = new ImageflowClient(smallTarget, connection);
  try {
    const { pipeline } = await client.generate('画像を3倍に拡大して、PNGで保存して');
    const events = [];
    for await (const event of client.execute(pipeline, sample)) events.push(event);
    const finished = events.at(-1).execution_finished;
    assert.equal(finished.state, 'EXECUTION_STATE_SUCCEEDED');
    const image = finished.outputs[0].image;
    assert.equal(image.width, 1353);
    assert.ok(image.data.length > 1024 * 1024, `${image.data.length} bytes`);
    assert.equal(Number(image.data_bytes), 0);
    assert.ok(Buffer.from(image.data).subarray(1, 4).equals(Buffer.from('PNG')));
    const again = await client.readOutput(events[0].execution_id, image.blob_ref);
    assert.ok(again.equals(Buffer.from(image.data)));
  } finally {
    client.close();
  }
});

test('a refused upload sends its head alone, an accepted one its pieces after the go-ahead', { skip: !target }, async () => {
  const client = new ImageflowClient(target, connection);
  const written = [];
  const open = client.pipelines.ExecutePipelineUpload.bind(client.pipelines);
  client.pipelines.ExecutePipelineUpload = (...args) => {
    const call = open(...args);
    const write = call.write.bind(call);
    call.write = (message, ...rest) => {
      written.push(message.head ? 'head' : 'piece');
      return write(message, ...rest);
    };
    return call;
  };
  try {
    await assert.rejects(
      (async () => {
        for await (const event of client.execute('pl_missing', Buffer.alloc(1024 * 1024), { uploadAbove: 1000 })) void event;
      })(),
      (error) => error.code === grpc.status.NOT_FOUND,
    );
    assert.deepEqual(written, ['head']);
    written.length = 0;
    const { pipeline } = await client.generate('グレースケールにして');
    const events = [];
    for await (const event of client.execute(pipeline, sample, { uploadAbove: 1000 })) events.push(event);
    assert.equal(events.at(-1).execution_finished.state, 'EXECUTION_STATE_SUCCEEDED');
    assert.equal(written[0], 'head');
    assert.equal(written.length, 1 + Math.ceil(sample.length / (64 * 1024)));
  } finally {
    client.close();
  }
});
