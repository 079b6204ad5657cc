#!/usr/bin/env node
'use strict';
// A gemma-serve client in Node.js: calls Forward and prints, per sequence and
// layer, the tensor's shape and a checksum (see tensors.js).
//
// It needs nothing from gemma-serve but protos/gemma/v1/gemma_service.proto,
// loaded at run time with @grpc/proto-loader: no generated code.
//
//   node forward.js --target 127.0.0.1:50051 --api-key KEY --text "Hello"
//   node forward.js --target HOST:PORT --ids 2,651,1234 --layers 0,-1 \
//       --pooling mean --dtype bfloat16 --json
//
// Options:
//   --target HOST:PORT    the service (required)
//   --api-key KEY         sent as `authorization: Bearer KEY`; default: the
//                         GEMMA_SERVE_API_KEY environment variable, else none
//   --text TEXT           a text to tokenize on the server (repeatable), or
//   --ids 1,2,3           a pre-tokenized sequence (repeatable)
//   --layers 0,-1         hidden-state layers; default: the server's ([-1])
//   --pooling none|last_token|mean             default none
//   --dtype float32|bfloat16|float16           default float32
//   --adapter ID          an adapter of the caller's tenant
//   --json                print one JSON object instead of text
//   --tls                 use TLS (system roots) instead of a plaintext channel
//   --proto-dir DIR       the directory holding gemma/v1/gemma_service.proto;
//                         default: ../../protos from this file
//
// Errors go to stderr as `forward.js: <CODE NAME>: <details>` (a gRPC status
// name; USAGE for bad arguments, DATA_LOSS for an inconsistent stream) and
// the exit status is 1.

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { ITEM_BYTES, decodeInto, checksum } = require('./tensors');

class CliError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

const OPTIONS = {
  target: { type: 'string' },
  'api-key': { type: 'string' },
  text: { type: 'string', multiple: true },
  ids: { type: 'string', multiple: true },
  layers: { type: 'string' },
  pooling: { type: 'string', default: 'none' },
  dtype: { type: 'string', default: 'float32' },
  adapter: { type: 'string', default: '' },
  json: { type: 'boolean', default: false },
  tls: { type: 'boolean', default: false },
  'proto-dir': { type: 'string', default: path.join(__dirname, '..', '..', 'protos') },
};
const POOLINGS = ['none', 'last_token', 'mean'];
const DTYPES = ['float32', 'bfloat16', 'float16'];

function parseOptions(argv) {
  // parseArgs refuses `--layers -1` (a value that starts with a dash); write
  // such pairs as `--layers=-1` first.
  const args = [];
  for (let i = 0; i < argv.length; i++) {
    const name = argv[i].startsWith('--') ? argv[i].slice(2) : null;
    if (OPTIONS[name]?.type === 'string' && i + 1 < argv.length) args.push(`${argv[i]}=${argv[++i]}`);
    else args.push(argv[i]);
  }
  let values;
  try {
    ({ values } = parseArgs({ args, options: OPTIONS, strict: true }));
  } catch (error) {
    throw new CliError('USAGE', error.message.split('\n')[0]);
  }
  if (!values.target) throw new CliError('USAGE', '--target HOST:PORT is required');
  if (!values.text === !values.ids) throw new CliError('USAGE', 'give --text or --ids (not both)');
  if (!POOLINGS.includes(values.pooling)) throw new CliError('USAGE', `--pooling: one of ${POOLINGS.join(', ')}`);
  if (!DTYPES.includes(values.dtype)) throw new CliError('USAGE', `--dtype: one of ${DTYPES.join(', ')}`);
  return values;
}

function parseInts(option, text) {
  return text.split(',').map((item) => {
    const value = Number(item.trim());
    if (item.trim() === '' || !Number.isInteger(value) || Math.abs(value) > 2 ** 31 - 1) {
      throw new CliError('USAGE', `${option}: ${JSON.stringify(text)} is not a list of integers like 1,2,3`);
    }
    return value;
  });
}

function loadService(protoDir) {
  const file = path.join(protoDir, 'gemma', 'v1', 'gemma_service.proto');
  if (!fs.existsSync(file)) throw new CliError('USAGE', `no ${file} (see --proto-dir)`);
  let definition;
  try {
    definition = protoLoader.loadSync('gemma/v1/gemma_service.proto', {
      includeDirs: [protoDir],
      keepCase: true,   // field names as in the .proto: token_ids, total_bytes
      longs: Number,    // int64s (shapes, total_bytes) as numbers
      enums: String,    // 'DTYPE_FLOAT32', not 1
      defaults: true,
      oneofs: true,     // ForwardResponse.kind says 'header' or 'chunk'
    });
  } catch (error) {
    throw new CliError('USAGE', `cannot load the proto from ${protoDir}: ${error.message}`);
  }
  return grpc.loadPackageDefinition(definition).gemma.v1.GemmaService;
}

// Reassembles the stream: one header, then chunks filling every (sequence,
// layer) tensor. Returns the header and tensors[sequence][layer index].
async function assemble(call) {
  let header = null;
  let tensors;
  let received = 0;
  const fail = (message) => { throw new CliError('DATA_LOSS', message); };
  for await (const response of call) {
    if (response.kind === 'header') {
      if (header) fail('a second header');
      header = response.header;
      tensors = header.sequences.map((info) => header.layers.map(
        () => new Float32Array(info.shape.reduce((a, b) => a * b, 1))));
      continue;
    }
    if (!header) fail('the stream did not start with a header');
    const chunk = response.chunk;
    const j = header.layers.indexOf(chunk.layer);
    const target = tensors[chunk.sequence_index]?.[j];
    if (!target) fail(`a chunk for sequence ${chunk.sequence_index}, layer ${chunk.layer}`);
    if (chunk.dtype !== header.dtype) fail(`a ${chunk.dtype} chunk in a ${header.dtype} stream`);
    const count = chunk.shape.reduce((a, b) => a * b, 1);
    if (chunk.data.length !== count * ITEM_BYTES[header.dtype]) fail('a chunk whose data does not match its shape');
    const row = chunk.shape.slice(1).reduce((a, b) => a * b, 1);  // elements per token
    const at = chunk.token_offset * row;
    if (at + count > target.length) fail('a chunk past the end of its tensor');
    decodeInto(header.dtype, chunk.data, target, at);
    received += chunk.data.length;
  }
  if (!header) fail('the stream did not start with a header');
  if (received !== header.total_bytes) fail(`received ${received} of ${header.total_bytes} bytes`);
  return { header, tensors };
}

function report({ header, tensors }) {
  return {
    request_id: header.request_id,
    worker_id: header.worker_id,
    model: header.model,
    adapter_id: header.adapter_id,
    pooling: header.pooling,
    dtype: header.dtype,
    sequences: header.sequences.map((info, i) => ({
      token_ids: info.token_ids,
      tensors: header.layers.map((layer, j) => ({ layer, shape: info.shape, ...checksum(tensors[i][j]) })),
    })),
  };
}

function printText(result) {
  console.log(`request ${result.request_id} on ${result.worker_id}: model ${result.model}, `
    + `${result.pooling}, ${result.dtype}${result.adapter_id ? `, adapter ${result.adapter_id}` : ''}`);
  result.sequences.forEach((sequence, i) => {
    console.log(`sequence ${i}: ${sequence.token_ids.length} tokens [${sequence.token_ids.join(', ')}]`);
    for (const t of sequence.tensors) {
      // Number's toString is the shortest text that reads back as the same double.
      console.log(`  layer ${t.layer}: shape [${t.shape.join(', ')}] sum=${t.sum} `
        + `abs_sum=${t.abs_sum} first=[${t.first.join(', ')}]`);
    }
  });
}

async function main() {
  const options = parseOptions(process.argv.slice(2));
  const request = {
    texts: options.text ?? [],
    sequences: (options.ids ?? []).map((ids) => ({ ids: parseInts('--ids', ids) })),
    layers: options.layers === undefined ? [] : parseInts('--layers', options.layers),
    pooling: `POOLING_${options.pooling.toUpperCase()}`,
    dtype: `DTYPE_${options.dtype.toUpperCase()}`,
    adapter_id: options.adapter,
  };
  const GemmaService = loadService(options['proto-dir']);
  const credentials = options.tls ? grpc.credentials.createSsl() : grpc.credentials.createInsecure();
  const client = new GemmaService(options.target, credentials);
  const metadata = new grpc.Metadata();
  const apiKey = options['api-key'] ?? process.env.GEMMA_SERVE_API_KEY;
  if (apiKey) metadata.set('authorization', `Bearer ${apiKey}`);

  const result = report(await assemble(client.Forward(request, metadata)));
  client.close();
  if (options.json) console.log(JSON.stringify(result));
  else printText(result);
}

main().catch((error) => {
  // gRPC errors carry a numeric code (and `details`); ours a code name.
  const code = typeof error.code === 'number' ? grpc.status[error.code] : error.code ?? 'UNKNOWN';
  console.error(`forward.js: ${code}: ${error.details ?? error.message}`);
  process.exit(1);
});
