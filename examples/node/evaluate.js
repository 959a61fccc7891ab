#!/usr/bin/env node
// Calls losswire's LossService.Evaluate from Node.js and checks every answer against expected values.
//
//   node evaluate.js --target 127.0.0.1:50051 --cases cases.json
//
// The case file (written by make_cases.py from losswire's in-process engine) lists loss configs,
// input tensors and the loss and gradients to expect. For each case this program builds the
// tensors from typed arrays, calls Evaluate with a deadline, decodes the loss and gradient bytes
// back into typed arrays, compares them within the case's tolerance, and prints
//   RESULT {json}   what the server returned (values as numbers), for other tools to read
//   PASS name ...   or   FAIL name: why
// and a final "SUMMARY passed=P failed=F". The exit status is 0 only if every case passed.
// A case with "expect_error" passes when the call fails with that gRPC status and the error's
// google.rpc.BadRequest detail names that field.
'use strict';

const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { parseArgs } = require('node:util');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const DEFAULT_PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');
const SERVICE_PROTO = 'losswire/v1/loss_service.proto';
const RPC_STATUS_PROTO = path.join(__dirname, 'google_rpc_status.proto');
const BAD_REQUEST_TYPE_URL = 'type.googleapis.com/google.rpc.BadRequest';

// The wire's dtypes this example handles, with the typed array that holds each one.
const TYPED_ARRAYS = {
  FLOAT32: Float32Array,
  FLOAT64: Float64Array,
  INT32: Int32Array,
  INT64: BigInt64Array,
};

// gRPC status numbers -> names (grpc.status maps names to numbers).
const STATUS_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, code]) => [code, name]));

const USAGE = 'usage: node evaluate.js --cases FILE [--target HOST:PORT] [--proto-root DIR] [--timeout SECONDS]';

class UsageError extends Error {}

function parseCommandLine() {
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        target: { type: 'string', default: 'localhost:50051' },
        cases: { type: 'string' },
        'proto-root': { type: 'string', default: DEFAULT_PROTO_ROOT },
        timeout: { type: 'string', default: '30' },
      },
    }));
  } catch (error) {
    throw new UsageError(error.message); // an unknown option or a missing value
  }
  if (!values.cases) throw new UsageError('--cases FILE is required');
  const timeoutS = Number(values.timeout);
  if (!(timeoutS > 0)) throw new UsageError(`--timeout must be a positive number of seconds, got '${values.timeout}'`);
  return { target: values.target, cases: values.cases, protoRoot: values['proto-root'], timeoutS };
}

// The LossService client class, from the .proto itself (no generated code).
function loadLossService(protoRoot) {
  const definition = protoLoader.loadSync(SERVICE_PROTO, {
    includeDirs: [protoRoot],
    keepCase: true, // field names as in the .proto: avg_factor, reduction_override...
    longs: Number, // int64 shapes as plain numbers (tensor dimensions fit in 2^53)
    enums: String, // dtype as 'FLOAT32'
    arrays: true, // a scalar's shape decodes as [] rather than missing
  });
  return grpc.loadPackageDefinition(definition).losswire.v1.LossService;
}

// google.protobuf.Struct as proto-loader (protobufjs) represents it: {fields: {key: Value}}. The Value
// fields are camelCase (numberValue...) even under keepCase: protobufjs's built-in copy of
// struct.proto names them so.
function toStruct(object) {
  return { fields: Object.fromEntries(Object.entries(object).map(([key, value]) => [key, toValue(value)])) };
}

function toValue(value) {
  if (value === null) return { nullValue: 'NULL_VALUE' };
  if (typeof value === 'number') return { numberValue: value };
  if (typeof value === 'string') return { stringValue: value };
  if (typeof value === 'boolean') return { boolValue: value };
  if (Array.isArray(value)) return { listValue: { values: value.map(toValue) } };
  if (typeof value === 'object') return { structValue: toStruct(value) };
  throw new TypeError(`a config value must be JSON, got ${typeof value}`);
}

// A losswire.v1.Tensor from a typed array: the array's own bytes, which are the wire's
// little-endian layout on a little-endian host (checked in main).
function tensorFromTypedArray(dtype, shape, array) {
  return { dtype, shape, data: Buffer.from(array.buffer, array.byteOffset, array.byteLength) };
}

// A case file tensor {dtype, shape, values} -> losswire.v1.Tensor.
function encodeTensor({ dtype, shape, values }) {
  const TypedArray = TYPED_ARRAYS[dtype];
  if (!TypedArray) throw new Error(`dtype ${dtype} is not handled by this example`);
  const array = TypedArray === BigInt64Array ? BigInt64Array.from(values, BigInt) : TypedArray.from(values);
  return tensorFromTypedArray(dtype, shape, array);
}

// losswire.v1.Tensor -> {dtype, shape, values: typed array}. The bytes are copied first: a Buffer
// received from the network can start at any offset, and a Float32Array view must be 4-byte aligned.
function decodeTensor(tensor) {
  const TypedArray = TYPED_ARRAYS[tensor.dtype];
  if (!TypedArray) throw new Error(`the server returned dtype ${tensor.dtype}, not handled by this example`);
  const count = tensor.shape.reduce((product, size) => product * size, 1);
  const expectedBytes = count * TypedArray.BYTES_PER_ELEMENT;
  if (tensor.data.length !== expectedBytes) {
    throw new Error(`${tensor.dtype} [${tensor.shape}] needs ${expectedBytes} bytes, got ${tensor.data.length}`);
  }
  const aligned = new Uint8Array(tensor.data).buffer;
  return { dtype: tensor.dtype, shape: tensor.shape, values: new TypedArray(aligned) };
}

// One LossTerm from a case. Optional fields are left out, not sent as defaults.
function buildTerm(testCase) {
  const term = {
    name: testCase.name,
    config: toStruct(testCase.config),
    pred: encodeTensor(testCase.pred),
    target: { tensor: encodeTensor(testCase.target) },
    gradients: testCase.gradients,
  };
  if (testCase.weight) term.weight = encodeTensor(testCase.weight);
  if (testCase.avg_factor !== undefined) term.avg_factor = testCase.avg_factor;
  if (testCase.reduction_override !== undefined) term.reduction_override = testCase.reduction_override;
  return term;
}

function evaluate(client, request, timeoutS) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + timeoutS * 1000);
    client.Evaluate(request, { deadline }, (error, response) => (error ? reject(error) : resolve(response)));
  });
}

// The google.rpc.BadRequest field paths in an error's `grpc-status-details-bin` trailer.
function violatedFields(error, rpcTypes) {
  const trailer = error.metadata ? error.metadata.get('grpc-status-details-bin') : [];
  if (trailer.length === 0) return [];
  const status = rpcTypes.Status.decode(trailer[0]);
  return status.details
    .filter((detail) => detail.type_url === BAD_REQUEST_TYPE_URL)
    .flatMap((detail) => rpcTypes.BadRequest.decode(detail.value).field_violations.map((v) => v.field));
}

// Differences between a decoded tensor and the expected {shape, values}; [] when they agree.
function compareTensor(label, got, want, rtol, atol) {
  if (JSON.stringify(got.shape) !== JSON.stringify(want.shape)) {
    return [`${label}: shape [${got.shape}], expected [${want.shape}]`];
  }
  // the first element outside the tolerance; written as !(diff <= tol) so that a NaN counts as outside
  const outside = got.values.findIndex(
    (value, i) => !(Math.abs(value - want.values[i]) <= atol + rtol * Math.abs(want.values[i])),
  );
  if (outside < 0) return [];
  const [value, expected] = [got.values[outside], want.values[outside]];
  return [`${label}[${outside}] = ${value}, expected ${expected} (rtol ${rtol}, atol ${atol})`];
}

function maxAbsDiff(got, want) {
  return got.values.reduce((worst, value, index) => Math.max(worst, Math.abs(value - want.values[index])), 0);
}

function gradientOf(result, key) {
  const gradient = (result.gradients || {})[key];
  if (!gradient) {
    throw new Error(`the response has no gradient '${key}' (it has: ${Object.keys(result.gradients || {})})`);
  }
  return gradient;
}

function printResult(object) {
  console.log(`RESULT ${JSON.stringify(object)}`);
}

// An expected value: the call must succeed and match. Returns true when it passed.
async function checkValues(client, testCase, timeoutS) {
  const response = await evaluate(client, { terms: [buildTerm(testCase)] }, timeoutS);
  const result = response.results[0];
  const loss = decodeTensor(result.loss);
  const gradients = Object.fromEntries(testCase.gradients.map((key) => [key, decodeTensor(gradientOf(result, key))]));
  const asJson = (t) => ({ shape: t.shape, values: Array.from(t.values) });
  printResult({
    case: testCase.name,
    loss: asJson(loss),
    gradients: Object.fromEntries(Object.entries(gradients).map(([key, t]) => [key, asJson(t)])),
  });
  const { expect, rtol, atol } = testCase;
  const problems = [
    ...compareTensor('loss', loss, expect.loss, rtol, atol),
    ...testCase.gradients.flatMap((key) =>
      compareTensor(`gradient ${key}`, gradients[key], expect.gradients[key], rtol, atol),
    ),
  ];
  if (problems.length > 0) {
    console.log(`FAIL ${testCase.name}: ${problems.join('; ')}`);
    return false;
  }
  const diffs = testCase.gradients.map((key) => `${key} ${maxAbsDiff(gradients[key], expect.gradients[key])}`);
  console.log(
    `PASS ${testCase.name}: loss [${loss.shape}] max|diff| ${maxAbsDiff(loss, expect.loss)}, ` +
      `gradient max|diff| ${diffs.join(', ')}`,
  );
  return true;
}

// An expected error: the call must fail with that status, naming that field. Returns true when it passed.
async function checkError(client, testCase, timeoutS, rpcTypes) {
  const { code, field } = testCase.expect_error;
  try {
    await evaluate(client, { terms: [buildTerm(testCase)] }, timeoutS);
  } catch (error) {
    const got = { code: STATUS_NAMES[error.code], message: error.details, fields: violatedFields(error, rpcTypes) };
    printResult({ case: testCase.name, error: got });
    if (got.code === code && got.fields.includes(field)) {
      console.log(`PASS ${testCase.name}: ${got.code} on field ${field}: ${got.message}`);
      return true;
    }
    const wanted = `expected ${code} on ${field}`;
    console.log(`FAIL ${testCase.name}: got ${got.code} on [${got.fields}], ${wanted}: ${got.message}`);
    return false;
  }
  console.log(`FAIL ${testCase.name}: the call succeeded, expected ${code}`);
  return false;
}

async function runCase(client, testCase, timeoutS, rpcTypes) {
  try {
    return testCase.expect_error
      ? await checkError(client, testCase, timeoutS, rpcTypes)
      : await checkValues(client, testCase, timeoutS);
  } catch (error) {
    const status = error.code !== undefined ? `${STATUS_NAMES[error.code]}: ${error.details}` : error.stack;
    console.log(`FAIL ${testCase.name}: ${status}`);
    return false;
  }
}

async function main() {
  // Typed arrays use the host's byte order; the wire is little-endian.
  if (os.endianness() !== 'LE') {
    throw new Error('this example sends typed arrays as they are: it needs a little-endian host');
  }
  const options = parseCommandLine();
  const { cases } = JSON.parse(fs.readFileSync(options.cases, 'utf8'));
  const rpcTypes = new protobuf.Root().loadSync(RPC_STATUS_PROTO, { keepCase: true }).lookup('google.rpc');
  const LossService = loadLossService(options.protoRoot);
  // grpc-js receives at most 4 MiB by default; a gradient is as big as its input. The server has its own
  // limit (--max-message-bytes).
  const client = new LossService(options.target, grpc.credentials.createInsecure(), {
    'grpc.max_receive_message_length': -1,
  });
  let passed = 0;
  try {
    for (const testCase of cases) {
      if (await runCase(client, testCase, options.timeoutS, rpcTypes)) passed += 1;
    }
  } finally {
    client.close();
  }
  console.log(`SUMMARY passed=${passed} failed=${cases.length - passed}`);
  process.exitCode = passed === cases.length && cases.length > 0 ? 0 : 1;
}

main().catch((error) => {
  console.error(error instanceof UsageError ? `${error.message}\n${USAGE}` : error.stack || String(error));
  process.exitCode = 2;
});
