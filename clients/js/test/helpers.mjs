// Shared by the Node tests of @wsgateway/client: the rig's addresses (env, set by tests/test_js_client.py,
// which starts nats-server, the test IdP and a real gateway) and waits on conditions (never on time).
import assert from 'node:assert/strict';

export const GW_WS = process.env.GW_WS;
export const GW_HTTP = process.env.GW_HTTP;
export const CONTROL = process.env.CONTROL;
export const NATS_URL = process.env.NATS_URL;
assert.ok(GW_WS && GW_HTTP && CONTROL, 'run through tests/test_js_client.py (GW_WS, GW_HTTP, CONTROL)');

export const HANG_MS = 30_000; // a hang guard, not a speed threshold

async function call(path, body) {
  const r = await fetch(`${CONTROL}${path}`, body === undefined ? {} : {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body),
  });
  const text = await r.text();
  assert.equal(r.status, 200, `${path}: HTTP ${r.status} ${text}`);
  return JSON.parse(text);
}

/** A fresh token from the test IdP (`bad: "issuer"` for one the gateway refuses). */
export async function token({ sub = 'alice', groups = [], expIn = 300, bad } = {}) {
  const q = new URLSearchParams({ sub, groups: groups.join(','), exp_in: String(expIn) });
  if (bad) q.set('bad', bad);
  return (await call(`/token?${q}`)).token;
}

/** A token provider that counts its calls. */
export function provider(opts = {}) {
  const p = async () => {
    p.calls += 1;
    return token(opts);
  };
  p.calls = 0;
  return p;
}

export const grant = (key, doc) => call('/acl', { key, doc });
export const revoke = (key) => call('/acl', { key, doc: null });
/** Publish `count` events to `scope` through the package's Publisher; their stream sequences. */
export async function publish(scope, { count = 1, type = 'test.tick', data, runId } = {}) {
  return (await call('/publish', { scope, count, type, data, run_id: runId, number: true })).seqs;
}
export const restartGateway = () => call('/restart', {});

/** Wait until `cond()` is truthy; returns its value. */
export async function until(cond, what, timeoutMs = HANG_MS) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    last = await cond();
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`gave up waiting for ${what} (last: ${JSON.stringify(last)})`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Collects what a client hands out: event seqs, all frames and notices, in order. */
export function collect(client) {
  const seen = { seqs: [], events: [], frames: [], notices: [] };
  client.on('event', (f) => {
    seen.seqs.push(f.seq);
    seen.events.push(f);
  });
  client.on('frame', (f) => seen.frames.push(f));
  client.on('gap', (g) => seen.notices.push(g));
  client.on('disconnected', (d) => seen.notices.push(d));
  return seen;
}
