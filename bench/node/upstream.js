'use strict';
/*
 * A fast stand-in for Stigg's API, for bench/cold_fill.py: the emulator's answers, recorded
 * beforehand, served from memory.
 *
 * The emulator is Python on one core (here about 2,500 entitlements.json and 1,600
 * entitlements-state.json answers a second), slower than the servers whose cold fill is measured,
 * so it would measure itself. This serves the same bytes for the same paths, and holds the
 * real-time socket the Node SDK needs before it trusts its cache. Nothing here ever changes, so no
 * subscription ever receives an update. Bench only.
 *
 *   RESPONSES=answers.json PORT=0 node upstream.js
 *
 * RESPONSES is a JSON file {"apiKey": "...", "responses": {"/v1/c/<id>/entitlements.json": {...}, ...}}.
 * - GET <path> (the query string ignored) with header x-api-key = apiKey: 200 and the recorded
 *   JSON; another key: 401; a path not recorded: 404.
 * - GET /_upstream/requests: {"<kind>": count} of the answered GETs (kind: the path with the
 *   customer id replaced by {customerId}).
 * - WebSocket /graphql, subprotocol graphql-transport-ws: connection_init with the key in
 *   payload.headers -> connection_ack (else close 4401); subscribe -> kept (never a next);
 *   ping -> pong; complete -> dropped.
 * Prints "fast upstream listening on http://HOST:PORT" once listening.
 */

const fs = require('fs');
const http = require('http');
const { WebSocketServer } = require('ws');

const CUSTOMER_PATH = /^\/v1\/c\/[^/]+\//;

function load(file) {
  const recorded = JSON.parse(fs.readFileSync(file, 'utf8'));
  const bodies = new Map();
  for (const [path, answer] of Object.entries(recorded.responses)) bodies.set(path, Buffer.from(JSON.stringify(answer)));
  return { apiKey: recorded.apiKey, bodies };
}

function json(res, status, body) {
  const bytes = Buffer.isBuffer(body) ? body : Buffer.from(JSON.stringify(body));
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': bytes.length }).end(bytes);
}

function headerKey(headers) {
  if (!headers || typeof headers !== 'object') return undefined;
  for (const [name, value] of Object.entries(headers)) if (name.toLowerCase() === 'x-api-key') return value;
  return undefined;
}

function main() {
  const { apiKey, bodies } = load(process.env.RESPONSES);
  const counts = {};
  const server = http.createServer((req, res) => {
    const path = req.url.split('?', 1)[0];
    if (req.method === 'GET' && path === '/_upstream/requests') return json(res, 200, counts);
    if (req.headers['x-api-key'] !== apiKey) {
      return json(res, 401, { errors: [{ message: 'Unauthenticated', extensions: { code: 'Unauthenticated' } }] });
    }
    const body = req.method === 'GET' ? bodies.get(path) : undefined;
    if (!body) return json(res, 404, { errors: [{ message: `not recorded: ${req.method} ${path}` }] });
    const kind = path.replace(CUSTOMER_PATH, '/v1/c/{customerId}/');
    counts[kind] = (counts[kind] || 0) + 1;
    return json(res, 200, body);
  });
  server.keepAliveTimeout = 60000;

  const sockets = new WebSocketServer({
    noServer: true,
    handleProtocols: (protocols) => (protocols.has('graphql-transport-ws') ? 'graphql-transport-ws' : false),
  });
  sockets.on('connection', (socket) => {
    let acknowledged = false;
    socket.on('message', (data) => {
      let message;
      try {
        message = JSON.parse(data.toString());
      } catch {
        socket.close(4400, 'Invalid message received');
        return;
      }
      if (message.type === 'connection_init') {
        if (headerKey(message.payload && message.payload.headers) !== apiKey) {
          socket.close(4401, 'Invalid API key');
          return;
        }
        acknowledged = true;
        socket.send(JSON.stringify({ type: 'connection_ack' }));
      } else if (message.type === 'ping') {
        socket.send(JSON.stringify({ type: 'pong' }));
      } else if (message.type === 'subscribe' && !acknowledged) {
        socket.close(4401, 'Unauthorized');
      }
      // subscribe (acknowledged), complete, pong: nothing to answer; nothing here ever changes
    });
  });
  server.on('upgrade', (req, socket, head) => {
    if (req.url.split('?', 1)[0] !== '/graphql') {
      socket.destroy();
      return;
    }
    sockets.handleUpgrade(req, socket, head, (ws) => sockets.emit('connection', ws, req));
  });

  const host = process.env.BIND_ADDRESS || '127.0.0.1';
  server.listen(Number(process.env.PORT || 0), host, () => {
    console.log(`fast upstream listening on http://${host}:${server.address().port}`);
  });
  const stop = () => {
    for (const socket of sockets.clients) socket.terminate();
    server.close(() => process.exit(0));
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main();
