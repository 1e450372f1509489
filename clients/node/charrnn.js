#!/usr/bin/env node
// Reference Node.js client for the CharRNN API, written from protos/charrnn/v1/charrnn.proto alone:
// the .proto is loaded at run time (no generated code), so this file is all a JavaScript user needs.
//
//   node charrnn.js info       --target 127.0.0.1:50051
//   node charrnn.js predict    --target 127.0.0.1:50051 hihell --per-char
//   node charrnn.js step-chain --target 127.0.0.1:50051 hihell
//   node charrnn.js generate   --target 127.0.0.1:50051 --prompt "The " --max-chars 200 --seed 1
//
// Every result is printed as JSON lines on stdout. On an RPC error the exit status is 1 and stderr holds
// one JSON line {"error": {"code": 3, "name": "INVALID_ARGUMENT", "details": "..."}}.
// A negative number must be joined to its flag: --temperature=-1.
'use strict';

const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO = path.join(__dirname, '..', '..', 'protos', 'charrnn', 'v1', 'charrnn.proto');

const USAGE = `usage: node charrnn.js COMMAND [--target HOST:PORT] [--proto FILE] [--timeout SECONDS] ...
  info
  predict TEXT [--per-char] [--top-k K]           one Predict stream; --per-char sends one message per character
  step-chain TEXT [--state BASE64] [--top-k K]    one Step call per character, passing the state on
  generate --prompt P --max-chars N [--seed S] [--temperature T] [--top-k K] [--top-p P] [--stop STR]...`;

// keepCase: field names exactly as in the .proto (max_chars, finish_reason); longs as strings, so a
// uint64 seed survives; enums by name (FINISH_REASON_LENGTH); defaults: unset fields are present.
function connect(target, protoFile) {
  const definition = protoLoader.loadSync(protoFile, { keepCase: true, longs: String, enums: String, defaults: true });
  const { CharRNN } = grpc.loadPackageDefinition(definition).charrnn.v1;
  return new CharRNN(target, grpc.credentials.createInsecure());
}

const emit = (object) => process.stdout.write(JSON.stringify(object) + '\n');
const candidates = (top) => top.map((c) => ({ text: c.text, probability: c.probability }));

// Promise-returning wrappers over the callback and stream APIs.
function unary(client, method, request, options) {
  return new Promise((resolve, reject) => {
    client[method](request, options, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

function drain(call, onMessage) {
  return new Promise((resolve, reject) => {
    call.on('data', onMessage);
    call.on('error', reject);
    call.on('end', resolve);
  });
}

async function info(client, args, options) {
  emit(await unary(client, 'GetModelInfo', {}, options));
}

async function predict(client, args, options) {
  const call = client.Predict(options);
  const done = drain(call, (r) => emit({ input: r.input, next: r.next, probability: r.probability, top: candidates(r.top) }));
  for (const chunk of args.perChar ? Array.from(args.text) : [args.text]) {
    call.write({ text: chunk, top_k: args.topK });
  }
  call.end();
  await done;
}

async function stepChain(client, args, options) {
  let state = Buffer.from(args.state, 'base64');
  for (const ch of Array.from(args.text)) {  // Array.from splits by code point, like the server
    const r = await unary(client, 'Step', { state, text: ch, top_k: args.topK }, options);
    state = r.state;
    emit({ input: ch, next: r.next, probability: r.probability, top: candidates(r.top), state: state.toString('base64') });
  }
}

async function generate(client, args, options) {
  const request = { prompt: args.prompt, max_chars: args.maxChars, top_k: args.topK, stop: args.stop };
  // Optional fields are sent only when given: unset temperature means 1.0, unset seed a fresh one.
  if (args.temperature !== undefined) request.temperature = args.temperature;
  if (args.topP !== undefined) request.top_p = args.topP;
  if (args.seed !== undefined) request.seed = args.seed;
  await drain(client.Generate(request, options),
    (r) => emit({ text: r.text, index: r.index, logprob: r.logprob, finish_reason: r.finish_reason }));
}

const COMMANDS = { info, predict, 'step-chain': stepChain, generate };

function number(name, value, integer) {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (value.trim() === '' || Number.isNaN(n) || (integer && !Number.isInteger(n))) {
    throw new Error(`--${name} must be ${integer ? 'an integer' : 'a number'}, got ${JSON.stringify(value)}`);
  }
  return n;
}

function parse(argv) {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: {
      target: { type: 'string', default: '127.0.0.1:50051' },
      proto: { type: 'string', default: PROTO },
      timeout: { type: 'string' },
      'per-char': { type: 'boolean', default: false },
      'top-k': { type: 'string', default: '0' },
      state: { type: 'string', default: '' },
      prompt: { type: 'string', default: '' },
      'max-chars': { type: 'string', default: '200' },
      temperature: { type: 'string' },
      'top-p': { type: 'string' },
      seed: { type: 'string' },
      stop: { type: 'string', multiple: true, default: [] },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  const [command, text, ...extra] = positionals;
  if (values.help || !(command in COMMANDS)) throw new Error(USAGE);
  const needsText = command === 'predict' || command === 'step-chain';
  if (needsText ? text === undefined || extra.length : text !== undefined) throw new Error(USAGE);
  if (values.seed !== undefined && !/^\d+$/.test(values.seed)) throw new Error('--seed must be a non-negative integer');
  return {
    command, text,
    target: values.target, proto: values.proto, timeout: number('timeout', values.timeout, false),
    perChar: values['per-char'], topK: number('top-k', values['top-k'], true), state: values.state,
    prompt: values.prompt, maxChars: number('max-chars', values['max-chars'], true),
    temperature: number('temperature', values.temperature, false), topP: number('top-p', values['top-p'], false),
    seed: values.seed, stop: values.stop,  // the seed stays a string: it is a uint64
  };
}

async function main() {
  let args;
  try {
    args = parse(process.argv.slice(2));
  } catch (error) {
    process.stderr.write(error.message + '\n');
    return 2;
  }
  const client = connect(args.target, args.proto);
  const options = args.timeout === undefined ? {} : { deadline: Date.now() + args.timeout * 1000 };
  try {
    await COMMANDS[args.command](client, args, options);
    return 0;
  } catch (error) {
    if (error.code === undefined) throw error;  // not an RPC status: a bug, show the stack
    const name = Object.keys(grpc.status).find((key) => grpc.status[key] === error.code);
    process.stderr.write(JSON.stringify({ error: { code: error.code, name, details: error.details } }) + '\n');
    return 1;
  } finally {
    client.close();
  }
}

main().then((code) => { process.exitCode = code; });
