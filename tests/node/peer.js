// Stigg's official Node server SDK (3.95.0) as a peer the test suite drives (tests/node_peer.py).
//
// One JSON request per stdin line, {"id", "op", ...}; one JSON line per answer on stdout,
// {"id", "ok": true, "result"} or {"id", "ok": false, "error"}. Events the SDK emits that were
// asked for with "listen" arrive as {"event": name, "at": epoch ms, "data"} lines.
// Ops:
//   init   {apiKey, baseUri, redis?: {host, port, environmentPrefix}, realtime}
//   check  {kind: boolean|numeric|metered|enum, customerId, featureId, resourceId?,
//           requestedUsage?, requestedValues?}
//   listen {event}
//   close
'use strict';

const readline = require('readline');
const { Stigg } = require('@stigg/node-server-sdk');

let client = null;

const quietLogger = {
  // The SDK's own lines go to stderr (the test keeps them for a failure message), never stdout.
  log: (...args) => process.stderr.write(args.map(String).join(' ') + '\n'),
  debug: () => {},
  warn: (...args) => process.stderr.write(args.map(String).join(' ') + '\n'),
  error: (...args) => process.stderr.write(args.map(String).join(' ') + '\n'),
};

function send(message) {
  process.stdout.write(JSON.stringify(message) + '\n');
}

async function init({ apiKey, baseUri, redis, realtime }) {
  const configuration = {
    apiKey,
    baseUri,
    baseEdgeUri: baseUri, // the emulator serves Edge's paths too
    realtimeUpdatesEnabled: !!realtime,
    enableRemoteConfig: false,
    entitlementsTimeout: 3000,
    logConfiguration: { logger: quietLogger, logLevel: 'error' },
  };
  if (redis) {
    configuration.redis = {
      host: redis.host,
      port: redis.port,
      environmentPrefix: redis.environmentPrefix,
      maxRetriesPerRequest: 1,
      retryStrategy: () => 200,
    };
  }
  client = Stigg.initialize(configuration);
  await client.waitForInitialization();
  return { initialized: true };
}

async function check({ kind, customerId, featureId, resourceId, requestedUsage, requestedValues }) {
  const params = { customerId, featureId, resourceId: resourceId || undefined, options: {} };
  let answer;
  switch (kind) {
    case 'boolean':
      answer = await client.getBooleanEntitlement(params);
      break;
    case 'numeric':
      answer = await client.getNumericEntitlement(params);
      break;
    case 'metered':
      params.options.requestedUsage = requestedUsage || 0;
      answer = await client.getMeteredEntitlement(params);
      break;
    case 'enum':
      params.options.requestedValues = requestedValues || [];
      answer = await client.getEnumEntitlement(params);
      break;
    default:
      throw new Error(`unknown kind ${kind}`);
  }
  return answer; // dates become ISO strings in JSON
}

function listen({ event }) {
  client.addListener(event, (data) => send({ event, at: Date.now(), data }));
  return { listening: event };
}

const ops = { init, check, listen, close: () => { client && client.close(); return { closed: true }; } };

readline.createInterface({ input: process.stdin }).on('line', async (line) => {
  let request;
  try {
    request = JSON.parse(line);
  } catch (e) {
    send({ id: null, ok: false, error: `not JSON: ${line}` });
    return;
  }
  try {
    const op = ops[request.op];
    if (!op) throw new Error(`unknown op ${request.op}`);
    send({ id: request.id, ok: true, result: await op(request) });
  } catch (e) {
    send({ id: request.id, ok: false, error: String((e && e.stack) || e) });
  }
}).on('close', () => process.exit(0));

send({ ready: true, node: process.version });
