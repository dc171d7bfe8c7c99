'use strict';
/*
 * The Node reference for the benchmarks: Stigg's own Node server SDK (@stigg/node-server-sdk 3.95.0)
 * behind @grpc/grpc-js, answering the sidecar's gRPC API (protos/stigg/sidecar/v1/sidecar.proto).
 *
 * Owns nothing but the translation: every read is the SDK's own call (getBooleanEntitlement,
 * getMeteredEntitlement, getEntitlements, ...) on the SDK's in-memory cache, which fills itself
 * from the API on a miss (Edge's entitlements.json) and, with real-time updates on, keeps itself
 * fresh from the API's WebSocket. The SDK's answer is mapped field for field to the proto response,
 * so the benchmarks compare the same answers over the same wire. Not a product: bench only.
 *
 *   STIGG_API_KEY=... STIGG_API_URL=http://127.0.0.1:PORT PORT=0 node server.js
 *
 * Environment:
 *   STIGG_API_KEY          the server API key (required; never printed)
 *   STIGG_API_URL          base URL of Stigg's API; also used for Edge and (ws://) the WebSocket
 *   PORT                   gRPC port on BIND_ADDRESS (0: any free port; the chosen one is printed)
 *   BIND_ADDRESS           default 127.0.0.1
 *   STATS_PORT             if set, GET /stats on it answers {"cacheEntries", "hits", "misses",
 *                          "heapUsed", "rss"} (the SDK's cache and its hit/miss events; bytes)
 *   REALTIME               1 (default) or 0: the SDK's real-time updates. Off, SDK 3.95 re-fetches
 *                          on every read (its in-memory cache is only trusted once subscribed).
 *   CACHE_MAX_SIZE_BYTES   the SDK's memoryCacheMaxSizeBytes (default: the SDK's own default)
 *
 * Prints "node reference listening on HOST:PORT" once the SDK has initialized and gRPC is bound;
 * exits non-zero if the SDK cannot initialize. SIGTERM/SIGINT: stop gRPC, close the SDK, exit 0.
 */

const http = require('http');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { Stigg, LogLevel } = require('@stigg/node-server-sdk');

const PROTO = path.resolve(__dirname, '..', '..', 'protos', 'stigg', 'sidecar', 'v1', 'sidecar.proto');

// Stigg's GraphQL strings -> the proto's enum names (the same tables as stigg_sidecar/grpc/convert.py).
const REASONS = {
  Unknown: 'ACCESS_DENIED_REASON_UNKNOWN',
  CustomerIsArchived: 'ACCESS_DENIED_REASON_CUSTOMER_IS_ARCHIVED',
  CustomerNotFound: 'ACCESS_DENIED_REASON_CUSTOMER_NOT_FOUND',
  CustomerResourceNotFound: 'ACCESS_DENIED_REASON_CUSTOMER_RESOURCE_NOT_FOUND',
  FeatureNotFound: 'ACCESS_DENIED_REASON_FEATURE_NOT_FOUND',
  NoActiveSubscription: 'ACCESS_DENIED_REASON_NO_ACTIVE_SUBSCRIPTION',
  NoFeatureEntitlementInSubscription: 'ACCESS_DENIED_REASON_NO_FEATURE_ENTITLEMENT_IN_SUBSCRIPTION',
  RequestedUsageExceedingLimit: 'ACCESS_DENIED_REASON_REQUESTED_USAGE_EXCEEDING_LIMIT',
  BudgetExceeded: 'ACCESS_DENIED_REASON_BUDGET_EXCEEDED',
  RequestedValuesMismatch: 'ACCESS_DENIED_REASON_REQUESTED_VALUES_MISMATCH',
  FeatureTypeMismatch: 'ACCESS_DENIED_REASON_FEATURE_TYPE_MISMATCH',
  InsufficientCredits: 'ACCESS_DENIED_REASON_INSUFFICIENT_CREDITS',
  Revoked: 'ACCESS_DENIED_REASON_REVOKED',
  EntitlementNotFound: 'ACCESS_DENIED_REASON_ENTITLEMENT_NOT_FOUND',
};
const FEATURE_TYPES = { BOOLEAN: 'FEATURE_TYPE_BOOLEAN', NUMBER: 'FEATURE_TYPE_NUMBER', ENUM: 'FEATURE_TYPE_ENUM' };
const METER_TYPES = {
  None: 'METER_TYPE_NONE',
  Fluctuating: 'METER_TYPE_FLUCTUATING',
  Incremental: 'METER_TYPE_INCREMENTAL',
};
const RESET_PERIODS = {
  DAY: 'ENTITLEMENT_RESET_PERIOD_DAY',
  HOUR: 'ENTITLEMENT_RESET_PERIOD_HOUR',
  MONTH: 'ENTITLEMENT_RESET_PERIOD_MONTH',
  WEEK: 'ENTITLEMENT_RESET_PERIOD_WEEK',
  YEAR: 'ENTITLEMENT_RESET_PERIOD_YEAR',
};

// -- SDK answer -> proto message (plain objects; protobufjs encodes them) -------------------------

function reason(name) {
  // An unrecognised reason is UNKNOWN, never dropped; none is an absent optional field.
  return name ? REASONS[name] || 'ACCESS_DENIED_REASON_UNKNOWN' : undefined;
}

function timestamp(date) {
  if (!date) return undefined;
  const ms = date.getTime();
  return { seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1e6 };
}

function feature(f) {
  if (!f) return undefined;
  return {
    id: f.id,
    featureType: FEATURE_TYPES[f.featureType] || 'FEATURE_TYPE_UNSPECIFIED',
    // The SDK's cache stores absent units as '' (CacheMapper); the proto field is optional.
    units: f.units || undefined,
    unitsPlural: f.unitsPlural || undefined,
    meterType: f.meterType ? METER_TYPES[f.meterType] || 'METER_TYPE_UNSPECIFIED' : 'METER_TYPE_NONE',
    isMetered: !!f.isMetered,
  };
}

function boolean(e) {
  return { feature: feature(e.feature) };
}

function numeric(e) {
  return { feature: feature(e.feature), value: e.value == null ? undefined : e.value, isUnlimited: !!e.isUnlimited };
}

function metered(e) {
  const end = timestamp(e.usagePeriodEnd);
  return {
    feature: feature(e.feature),
    usageLimit: e.usageLimit == null ? undefined : e.usageLimit,
    isUnlimited: !!e.isUnlimited,
    currentUsage: e.currentUsage || 0,
    resetPeriod: e.resetPeriod ? RESET_PERIODS[e.resetPeriod] : undefined,
    nextResetDate: end,
    usagePeriodAnchor: timestamp(e.usagePeriodAnchor),
    usagePeriodStart: timestamp(e.usagePeriodStart),
    usagePeriodEnd: end,
    hasSoftLimit: e.hasSoftLimit,
  };
}

function enumEntitlement(e) {
  return { feature: feature(e.feature), enumValues: e.enumValues || [] };
}

const BUILDERS = { BOOLEAN: ['boolean', boolean], NUMERIC: ['numeric', numeric], METERED: ['metered', metered], ENUM: ['enum', enumEntitlement] };

function decision(e) {
  return { hasAccess: !!e.hasAccess, isFallback: !!e.isFallback, accessDeniedReason: reason(e.accessDeniedReason) };
}

function typed(e) {
  // {boolean|numeric|metered|enum: ...} for the oneof of Entitlement, EntitlementV2, GetEntitlementResponse
  const builder = BUILDERS[e.type];
  return builder ? { [builder[0]]: builder[1](e) } : {};
}

// -- request options -> SDK options ----------------------------------------------------------------

function fallback(f) {
  if (!f) return undefined;
  const out = { hasAccess: !!f.hasAccess };
  if (f.value != null) out.value = f.value;
  if (f.isUnlimited != null) out.isUnlimited = f.isUnlimited;
  if (f.usageLimit != null) out.usageLimit = f.usageLimit;
  if (f.enumValues && f.enumValues.length) out.enumValues = f.enumValues;
  return out;
}

function args(request, options) {
  return { customerId: request.customerId, featureId: request.featureId, resourceId: request.resourceId || undefined, options };
}

// -- the service -----------------------------------------------------------------------------------

function unary(handler) {
  return (call, callback) => {
    handler(call.request).then(
      (response) => callback(null, response),
      (err) => callback({ code: grpc.status.INTERNAL, details: String((err && err.message) || err) }),
    );
  };
}

function service(stigg) {
  return {
    GetBooleanEntitlement: unary(async (req) => {
      const o = req.options || {};
      const e = await stigg.getBooleanEntitlement(args(req, { fallback: fallback(o.fallback) }));
      return { ...decision(e), entitlement: boolean(e) };
    }),
    GetNumericEntitlement: unary(async (req) => {
      const o = req.options || {};
      const e = await stigg.getNumericEntitlement(args(req, { fallback: fallback(o.fallback) }));
      return { ...decision(e), entitlement: numeric(e) };
    }),
    GetMeteredEntitlement: unary(async (req) => {
      const o = req.options || {};
      const e = await stigg.getMeteredEntitlement(
        args(req, { requestedUsage: o.requestedUsage, fallback: fallback(o.fallback) }),
      );
      return { ...decision(e), requestedUsage: e.requestedUsage || 0, entitlement: metered(e) };
    }),
    GetEnumEntitlement: unary(async (req) => {
      const o = req.options || {};
      const e = await stigg.getEnumEntitlement(
        args(req, { requestedValues: o.requestedValues, fallback: fallback(o.fallback) }),
      );
      return { ...decision(e), requestedValues: e.requestedValues || [], entitlement: enumEntitlement(e) };
    }),
    GetEntitlement: unary(async (req) => {
      const o = req.options || {};
      const e = await stigg.getEntitlement(
        args(req, {
          requestedUsage: o.requestedUsage,
          requestedValues: o.requestedValues,
          fallback: fallback(o.fallback),
        }),
      );
      return { ...decision(e), ...typed(e) };
    }),
    GetEntitlements: unary(async (req) => {
      const list = await stigg.getEntitlements(req.customerId, req.resourceId || undefined);
      return { entitlements: list.map(typed) };
    }),
    // SDK 3.95 has no entitlements-state call: its getEntitlements decides each cached entitlement.
    GetEntitlementsStateV2: unary(async (req) => {
      const list = await stigg.getEntitlements(req.customerId, req.resourceId || undefined);
      return { entitlements: list.map((e) => ({ ...decision(e), ...typed(e) })) };
    }),
  };
}

// -- process ---------------------------------------------------------------------------------------

function wsUrl(apiUrl) {
  const url = new URL(apiUrl);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  return url.toString().replace(/\/$/, '');
}

function startStats(stigg, counts, port, host) {
  const server = http.createServer((req, res) => {
    if (req.url !== '/stats') {
      res.writeHead(404).end();
      return;
    }
    // The SDK's in-memory LRU (lru-cache) of customers; reached through its internals, bench only.
    const cache = stigg.entitlementsService.cacheService.entitlements;
    const { heapUsed, rss } = process.memoryUsage();
    const body = JSON.stringify({ cacheEntries: cache.size, ...counts, heapUsed, rss });
    res.writeHead(200, { 'content-type': 'application/json' }).end(body);
  });
  return new Promise((resolve) => server.listen(Number(port), host, () => resolve(server)));
}

async function main() {
  const apiKey = process.env.STIGG_API_KEY;
  const apiUrl = process.env.STIGG_API_URL;
  if (!apiKey || !apiUrl) {
    console.error('STIGG_API_KEY and STIGG_API_URL are required');
    process.exit(2);
  }
  const host = process.env.BIND_ADDRESS || '127.0.0.1';
  const config = {
    apiKey,
    baseUri: apiUrl,
    baseEdgeUri: apiUrl,
    wsUrl: wsUrl(apiUrl),
    realtimeUpdatesEnabled: process.env.REALTIME !== '0',
    logConfiguration: { logger: console, logLevel: LogLevel.ERROR },
  };
  if (process.env.CACHE_MAX_SIZE_BYTES) config.memoryCacheMaxSizeBytes = Number(process.env.CACHE_MAX_SIZE_BYTES);
  const stigg = Stigg.initialize(config);
  const counts = { hits: 0, misses: 0 };
  stigg.addListener('cacheHit', () => counts.hits++);
  stigg.addListener('cacheMiss', () => counts.misses++);
  try {
    await stigg.waitForInitialization();
  } catch (err) {
    console.error(`the Stigg SDK did not initialize: ${(err && err.message) || err}`);
    process.exit(1);
  }

  const definition = protoLoader.loadSync(PROTO, { keepCase: false, longs: Number, enums: String, defaults: false, oneofs: true });
  const proto = grpc.loadPackageDefinition(definition).stigg.sidecar.v1;
  const server = new grpc.Server();
  server.addService(proto.SidecarService.service, service(stigg));
  const port = await new Promise((resolve, reject) =>
    server.bindAsync(`${host}:${process.env.PORT || 0}`, grpc.ServerCredentials.createInsecure(), (err, bound) =>
      err ? reject(err) : resolve(bound),
    ),
  );
  let stats = null;
  if (process.env.STATS_PORT) {
    stats = await startStats(stigg, counts, process.env.STATS_PORT, host);
    console.log(`node reference stats on http://${host}:${stats.address().port}/stats`);
  }

  const stop = () => {
    server.tryShutdown(() => {
      stigg.close();
      if (stats) stats.close();
      process.exit(0);
    });
    setTimeout(() => process.exit(0), 5000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  console.log(`node reference listening on ${host}:${port}`);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
