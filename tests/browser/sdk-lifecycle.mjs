// @wsgateway/client in headless Debian Chromium beyond a drop (tests/test_js_client.py): the built ESM the
// gateway serves (/static/sdk/index.js), the browser's own WebSocket and fetch, a real gateway.
//
// Usage: node tests/browser/sdk-lifecycle.mjs '<json config>'
//   {"gateway": "http://127.0.0.1:<port>", "control": "http://127.0.0.1:<port>", "leewayS": 1,
//    "scopes": {"refresh": ..., "revoke": ..., "marker": ..., "final": ..., "sse": ..., "restart": ...}}
//
// One page, one client per scenario (each with its own recorder: event seqs, control frames, notices, states,
// token-provider calls), every wait on a condition:
//   refresh  short-lived tokens (exp in 6 s): `refresh` before expiry; the connection outlives the first
//            token's session (exp + the gateway's leeway) with no 4408, events before and after arrive
//            (runs while the next three scenarios run);
//   final    a token from the wrong issuer: close 4401 is final (no retry), connect() and iteration reject
//            with GatewayClosedError;
//   revoke   an ACL change: `revoked` surfaced, nothing of the scope while revoked (a marker on a second
//            scope proves the gateway has seen those events), a re-grant: `subscribed` again, events resume;
//   sse      transport "sse" (fetch, Last-Event-ID): live events, a drop mid-stream, the resume;
//   restart  the gateway restarted (the control API) mid-stream: reconnect with backoff, resume, nothing
//            lost or doubled.
// Prints one JSON line: {<scenario>: {published, rec, client state}, ...}.

import process from 'node:process';

import { main } from './chromium.mjs';

const config = JSON.parse(process.argv[2] ?? '{}');
const T = 30000; // hang guard, not a speed threshold
const S = config.scopes;

async function control(path, body) {
  const r = await fetch(`${config.control}${path}`, body === undefined ? {} : {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body),
  });
  if (r.status !== 200) throw new Error(`${path}: HTTP ${r.status} ${await r.text()}`);
  return r.json();
}
const publish = async (scope, count) => (await control('/publish', { scope, count, number: true })).seqs;
const acl = (scope, members) => control('/acl', { key: `acme.${scope.replace(':', '.')}`, doc: { members } });

// What Chromium itself logs while the gateway is down for the restart (a refused connection): expected there.
const REFUSED = /^console: WebSocket connection to 'ws:\/\/127\.0\.0\.1:\d+\/v1\/ws\?[^']*' failed: /;

await main(config, async (page) => {
  // console errors: a refused connection is expected while the gateway is down (restart), nothing else
  const consoleErrors = { refusedDuringRestart: 0, unexpected: [] };
  let restarting = false;
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    const text = `console: ${m.text()}`;
    if (restarting && REFUSED.test(text)) consoleErrors.refusedDuringRestart += 1;
    else consoleErrors.unexpected.push(text);
  });
  await page.exposeFunction('freshToken', async (opts) => {
    const q = new URLSearchParams({ sub: 'alice', exp_in: String(opts.expIn ?? 300) });
    if (opts.bad) q.set('bad', opts.bad);
    return (await control(`/token?${q}`)).token;
  });
  await page.route('**/favicon.ico', (route) => route.fulfill({ status: 204 })); // the gateway has none
  await page.goto(`${config.gateway}/healthz`, { waitUntil: 'load' });
  await page.evaluate(async () => {
    const sdk = await import('/static/sdk/index.js');
    window.sdk = sdk;
    window.c = {};
    window.nativeWebSocket = typeof WebSocket === 'function' && typeof fetch === 'function';
    // One client and its recorder per scenario.
    window.make = (name, { tokenOpts = {}, ws = true, ...options }) => {
      const rec = { seqs: [], frames: [], notices: [], states: [], tokens: 0 };
      const base = new URL('/v1/ws', location.href);
      base.protocol = 'ws:';
      const client = new sdk.GatewayClient({
        url: ws ? base.href : location.origin,
        token: async () => {
          rec.tokens += 1;
          return window.freshToken(tokenOpts);
        },
        backoff: { initialMs: 50, maxMs: 500 },
        ...options,
      });
      client.on('event', (f) => rec.seqs.push(f.seq));
      client.on('frame', (f) => { if (f.type !== 'event') rec.frames.push(f); });
      client.on('gap', (g) => rec.notices.push(g));
      client.on('disconnected', (d) => rec.notices.push(d));
      client.on('state', (s) => rec.states.push(s));
      window.c[name] = { client, rec };
      return client;
    };
    window.snapshot = (name) => {
      const { client, rec } = window.c[name];
      return {
        ...rec, state: client.state, transport: client.transport, connects: client.connects,
        duplicates: client.duplicates, cursor: client.cursor, expiresAt: client.welcome?.expires_at ?? null,
      };
    };
  });
  const wait = async (what, fn, arg) => {
    try {
      await page.waitForFunction(fn, arg, { timeout: T, polling: 20 });
    } catch (e) {
      const state = await page.evaluate(() => Object.keys(window.c).map((n) => [n, window.snapshot(n)]));
      e.extra = { waitingFor: what, state: Object.fromEntries(state) };
      throw e;
    }
  };
  const snap = (name) => page.evaluate((n) => window.snapshot(n), name);
  const out = {};

  // refresh: started first, checked after the three next scenarios (its tokens live 6 s)
  await page.evaluate((scope) => {
    window.make('refresh', { scopes: [scope], tokenOpts: { expIn: 6 }, refreshLeadS: 3, transport: 'websocket' });
    return window.c.refresh.client.connect().then(() => undefined);
  }, S.refresh);
  await wait('refresh: the live start position', () => window.c.refresh.client.cursor !== null);
  const refreshPublished = await publish(S.refresh, 3);

  // final: 4401
  out.final = await page.evaluate(async (scope) => {
    const client = window.make('final', { scopes: [scope], tokenOpts: { bad: 'issuer' }, transport: 'websocket' });
    const iteration = (async () => {
      for await (const _ of client.frames()) { /* drain */ }
      return null;
    })().catch((e) => e);
    const describe = (e) => ({
      name: e?.name, isClosedError: e instanceof window.sdk.GatewayClosedError, code: e?.code, reason: e?.reason,
    });
    const connectError = await client.connect().then(() => null, (e) => e);
    const iterationError = await iteration;
    const closed = await client.closed();
    return {
      connect: describe(connectError), iteration: describe(iterationError), closed: describe(closed),
      ...window.snapshot('final'),
    };
  }, S.final);

  // revoke: revoked, nothing while revoked, re-grant
  await acl(S.revoke, ['user:alice']);
  await acl(S.marker, ['user:alice']);
  await page.evaluate(({ revoke, marker }) => {
    window.make('revoke', { scopes: [revoke, marker], transport: 'websocket' });
    return window.c.revoke.client.connect().then(() => undefined);
  }, { revoke: S.revoke, marker: S.marker });
  const subscribedTo = (scope, n) => [
    `revoke: subscribed ${n}x to ${scope}`,
    ([s, k]) => window.c.revoke.rec.frames.filter((f) => f.type === 'subscribed' && f.scope === s).length >= k,
    [scope, n],
  ];
  await wait(...subscribedTo(S.revoke, 1));
  await wait(...subscribedTo(S.marker, 1));
  const revokeBefore = await publish(S.revoke, 3);
  await wait('revoke: three events', (n) => window.c.revoke.rec.seqs.length >= n, 3);
  await acl(S.revoke, []);
  await wait('revoke: the revoked frame', () => window.c.revoke.rec.frames.some((f) => f.type === 'revoked'));
  const withheld = await publish(S.revoke, 2);
  const [marker] = await publish(S.marker, 1);
  await wait('revoke: the marker', (m) => window.c.revoke.rec.seqs.includes(m), marker);
  await acl(S.revoke, ['user:alice']);
  await wait(...subscribedTo(S.revoke, 2));
  const revokeAfter = await publish(S.revoke, 3);
  await wait('revoke: the events after the re-grant', (m) => window.c.revoke.rec.seqs.includes(m), revokeAfter[2]);
  out.revoke = { before: revokeBefore, withheld, marker, after: revokeAfter, ...await snap('revoke') };
  await page.evaluate(() => window.c.revoke.client.close());

  // sse: live, a drop mid-stream, the resume (Last-Event-ID)
  await page.evaluate((scope) => {
    window.make('sse', { scopes: [scope], transport: 'sse', ws: false });
    return window.c.sse.client.connect().then(() => undefined);
  }, S.sse);
  await wait('sse: the live start position', () => window.c.sse.client.cursor !== null);
  const ssePublished = await publish(S.sse, 5);
  await wait('sse: three events', (n) => window.c.sse.rec.seqs.length >= n, 3);
  await page.evaluate(() => window.c.sse.client.drop({ reconnectInMs: 100 }));
  ssePublished.push(...await publish(S.sse, 5));
  await wait('sse: every event after the resume',
    (n) => window.c.sse.rec.seqs.length >= n && window.c.sse.client.connects >= 2, ssePublished.length);
  out.sse = { published: ssePublished, ...await snap('sse') };
  await page.evaluate(() => window.c.sse.client.close()); // (the test's restart is no SIGTERM: SSE would not end)

  // refresh, checked: past the first token's session end, still the first connection, events still arrive
  const first = await snap('refresh');
  const sessionEnd = first.expiresAt + config.leewayS;
  await wait('refresh: past the first token\'s session end',
    (end) => Date.now() / 1000 > end + 0.5 && window.c.refresh.rec.frames.some((f) => f.type === 'refreshed'),
    sessionEnd);
  refreshPublished.push(...await publish(S.refresh, 3));
  await wait('refresh: the events after expiry', (n) => window.c.refresh.rec.seqs.length >= n, refreshPublished.length);
  const pong = await page.evaluate(() => window.c.refresh.client.ping());
  out.refresh = { published: refreshPublished, firstExpiresAt: first.expiresAt, sessionEnd, pong,
    checkedAt: await page.evaluate(() => Date.now() / 1000), ...await snap('refresh') };
  await page.evaluate(() => window.c.refresh.client.close());

  // restart: the gateway goes away mid-stream and comes back on the same port
  await page.evaluate((scope) => {
    window.make('restart', { scopes: [scope], transport: 'websocket' });
    return window.c.restart.client.connect().then(() => undefined);
  }, S.restart);
  await wait('restart: the live start position', () => window.c.restart.client.cursor !== null);
  const restartPublished = await publish(S.restart, 5);
  await wait('restart: five events', (n) => window.c.restart.rec.seqs.length >= n, 5);
  restarting = true;
  await control('/restart', {}); // returns once the new gateway answers /readyz
  restartPublished.push(...await publish(S.restart, 5));
  await wait('restart: every event after the restart',
    (n) => window.c.restart.rec.seqs.length >= n && window.c.restart.client.state === 'open', restartPublished.length);
  restarting = false;
  out.restart = { published: restartPublished, ...await snap('restart') };

  out.nativeWebSocket = await page.evaluate(() => window.nativeWebSocket);
  await page.evaluate(() => Object.values(window.c).forEach(({ client }) => client.close()));
  out.states = await page.evaluate(() => Object.fromEntries(Object.keys(window.c).map((n) => [n, window.c[n].client.state])));
  out.consoleErrors = consoleErrors;
  return out;
}, { consoleErrorsAreProblems: false });
