// @wsgateway/client in Node against a real gateway (tests/test_js_client.py starts nats-server, the test
// IdP and the gateway, and runs `node --test` on this file). Node 20 has no stable global WebSocket: the
// client finds npm `ws` by itself.
import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import { after, before, describe, test } from 'node:test';

import {
  GatewayClient, GatewayClosedError, GatewayInputError, isEventType,
} from '../dist/index.js';
import {
  GW_HTTP, GW_WS, collect, grant, provider, publish, restartGateway, token, until,
} from './helpers.mjs';

const FAST = { backoff: { initialMs: 50, maxMs: 500 } };

before(async () => {
  for (const id of ['c1', 'c2', 'c3', 'c4', 'c5', 'c6', 'c7', 'c8']) {
    await grant(`acme.conversation.${id}`, { members: ['user:alice'] });
  }
});

describe('bad input is refused before anything is sent', { timeout: 60_000 }, () => {
  let server;
  let connections = 0;
  let url;
  before(async () => {
    server = createServer((sock) => {
      connections += 1;
      sock.destroy();
    });
    await new Promise((r) => server.listen(0, '127.0.0.1', r));
    url = `ws://127.0.0.1:${server.address().port}/v1/ws`;
  });
  after(() => server.close());

  const cases = [
    ['a wrong URL scheme', { url: 'nats://127.0.0.1:4222', token: 'x.y.z' }, 'url', /scheme "nats:"/],
    ['not a URL', { url: 'gateway', token: 'x.y.z' }, 'url', /not a URL/],
    ['a WebSocket URL that is not /v1/ws', { url: 'ws://127.0.0.1:1/ws', token: 'x.y.z' }, 'url', /\/v1\/ws/],
    ['a token in the URL', { url: 'ws://127.0.0.1:1/v1/ws?access_token=a', token: 'x.y.z' }, 'url', /access_token/],
    ['an unknown scope kind', { scopes: ['tenant:acme'] }, 'scopes[0]', /not a scope/],
    ['a scope with a newline', { scopes: ['conversation:c1\n'] }, 'scopes[0]', /not a scope/],
    ['a scope id too long', { scopes: [`conversation:${'x'.repeat(129)}`] }, 'scopes[0]', /not a scope/],
    ['scopes that are not an array', { scopes: 'conversation:c1' }, 'scopes', /array of scopes/],
    ['a negative since', { since: -1 }, 'since', /stream sequence/],
    ['a fractional since', { since: 1.5 }, 'since', /stream sequence/],
    ['a since with a sign', { since: '+5' }, 'since', /stream sequence/],
    ['a since beyond 2^53', { since: '99999999999999999' }, 'since', /stream sequence/],
    ['a token with a space', { token: 'a b' }, 'token', /access token/],
    ['an empty token', { token: '' }, 'token', /access token/],
    ['an unknown transport', { transport: 'polling' }, 'transport', /"auto", "websocket" or "sse"/],
    ['presence that is not a boolean', { presence: 'yes' }, 'presence', /boolean/],
    ['listed that is not a boolean', { listed: 0 }, 'listed', /boolean/],
    ['compact that is not a boolean', { compact: 'true' }, 'compact', /boolean/],
  ];
  for (const [name, opts, parameter, message] of cases) {
    test(name, () => {
      assert.throws(() => new GatewayClient({ url, token: 'x.y.z', ...opts }), (e) => {
        assert.ok(e instanceof GatewayInputError, e);
        assert.equal(e.parameter, parameter);
        assert.match(e.message, message);
        return true;
      });
    });
  }

  test('subscribe() checks its scope before sending', async () => {
    const client = new GatewayClient({ url, token: 'x.y.z', scopes: ['conversation:c1'], ...FAST });
    assert.throws(() => client.subscribe('conversation:a b'), GatewayInputError);
    assert.throws(() => client.unsubscribe('*:x'), GatewayInputError);
    client.close();
    assert.equal(connections, 0, 'nothing was sent');
  });
});

describe('against a real gateway', { timeout: 120_000 }, () => {
  test('live events, in order, typed', async () => {
    const client = new GatewayClient({ url: GW_WS, token: provider(), scopes: ['conversation:c1'], ...FAST });
    const seen = collect(client);
    const welcome = await client.connect();
    assert.equal(welcome.principal.id, 'user:alice');
    assert.equal(client.transport, 'websocket');
    await until(() => client.cursor !== null, 'the live start position');
    const seqs = await publish('conversation:c1', { count: 3 });
    await publish('conversation:c1', {
      type: 'run.message.delta', runId: 'r1', data: { message_id: 'm1', delta: 'Hello' },
    });
    await until(() => seen.events.length === 4, 'four events');
    assert.deepEqual(seen.seqs.slice(0, 3), seqs);
    const last = seen.events[3].event;
    assert.ok(isEventType(last, 'run.message.delta'));
    assert.equal(last.data.delta, 'Hello');
    assert.equal(client.cursor, seen.seqs[3]);
    client.close();
    assert.equal(await client.closed(), null);
  });

  test('async iteration ends when the client is closed', async () => {
    const client = new GatewayClient({ url: GW_WS, token: provider(), scopes: ['conversation:c2'], ...FAST });
    const events = client.events(); // sees everything from now on
    await client.connect();
    await until(() => client.cursor !== null, 'the live start position');
    const seqs = await publish('conversation:c2', { count: 3 });
    const got = [];
    for await (const frame of events) {
      got.push(frame.seq);
      if (got.length === 3) client.close();
    }
    assert.deepEqual(got, seqs);
  });

  test('subscribe and unsubscribe on an open connection', async () => {
    const client = new GatewayClient({ url: GW_WS, token: provider(), scopes: ['conversation:c1'], ...FAST });
    const seen = collect(client);
    await client.connect();
    const sub = await client.subscribe('conversation:c3');
    assert.equal(sub.type, 'subscribed');
    assert.equal(sub.scope, 'conversation:c3');
    assert.deepEqual(client.scopes, ['conversation:c1', 'conversation:c3']);
    const [c3] = await publish('conversation:c3');
    await until(() => seen.seqs.includes(c3), 'the c3 event');
    const unsub = await client.unsubscribe('conversation:c3');
    assert.equal(unsub.type, 'unsubscribed');
    await publish('conversation:c3');
    const [marker] = await publish('conversation:c1');
    await until(() => seen.seqs.includes(marker), 'the marker');
    assert.deepEqual(seen.seqs, [c3, marker], 'nothing of c3 after unsubscribe (the marker came next)');
    const forbidden = await client.subscribe('conversation:not-yours');
    assert.equal(forbidden.type, 'error');
    assert.equal(forbidden.code, 'forbidden');
    client.close();
  });

  test('* (the default): every visible scope in one stream, each event once', async () => {
    await grant('acme.org', { admins: ['user:olga'] });
    const client = new GatewayClient({ url: GW_WS, token: provider({ sub: 'olga' }), ...FAST });
    assert.deepEqual(client.scopes, ['*']);
    const seen = collect(client);
    await client.connect();
    const sub = await client.subscribe('conversation:c1'); // also explicit: still each event once
    assert.equal(sub.type, 'subscribed');
    const expected = [];
    for (const scope of ['conversation:c1', 'process:w1', 'agent:w2', 'conversation:c1']) {
      expected.push(...await publish(scope));
    }
    await until(() => seen.seqs.length >= expected.length, `${expected.length} events`);
    assert.deepEqual(seen.seqs, expected);
    const unsub = await client.unsubscribe('*');
    assert.equal(unsub.type, 'unsubscribed');
    await publish('process:w1');
    const [marker] = await publish('conversation:c1');
    await until(() => seen.seqs.includes(marker), 'the marker');
    assert.deepEqual(seen.seqs, [...expected, marker], 'after unsubscribing *, only conversation:c1');
    client.close();
  });

  test('a drop mid-stream resumes from the cursor: nothing lost, nothing twice', async () => {
    const client = new GatewayClient({ url: GW_WS, token: provider(), scopes: ['conversation:c4', 'conversation:c5'],
      ...FAST });
    const seen = collect(client);
    await client.connect();
    await until(() => client.cursor !== null, 'the live start position');
    const expected = [];
    expected.push(...await publish('conversation:c4', { count: 10 }));
    await until(() => seen.seqs.length >= 5, 'five events');
    client.drop({ reconnectInMs: 300 });
    expected.push(...await publish('conversation:c5', { count: 10 }));
    expected.push(...await publish('conversation:c4', { count: 10 }));
    await until(() => seen.seqs.length >= expected.length, `${expected.length} events`);
    assert.deepEqual(seen.seqs, expected);
    assert.equal(client.connects, 2);
    const resumed = seen.frames.filter((f) => f.type === 'subscribed' && f.since !== undefined);
    assert.ok(resumed.length === 2 && resumed.every((f) => f.recovered === true), JSON.stringify(resumed));
    client.close();
  });

  test('compact: a resume gets the missed deltas of a message merged into one, with the last seq', async () => {
    const first = new GatewayClient({ url: GW_WS, token: provider(), scopes: ['conversation:c7'], ...FAST });
    const early = collect(first);
    await first.connect();
    await until(() => first.cursor !== null, 'the live start position');
    const delta = { type: 'run.message.delta', runId: 'r1', data: { message_id: 'm1', delta: 'a' } };
    const [one] = await publish('conversation:c7', delta);
    await until(() => early.seqs.length === 1, 'the first delta');
    first.close();
    const missed = await publish('conversation:c7', { ...delta, count: 20 }); // while the page was away
    const again = new GatewayClient({ url: GW_WS, token: provider(), scopes: ['conversation:c7'], since: one,
      compact: true, ...FAST });
    const seen = collect(again);
    await again.connect();
    await until(() => seen.seqs.includes(missed.at(-1)), 'the merged delta');
    assert.deepEqual(seen.seqs, [missed.at(-1)]); // one frame for 20 deltas, carrying the last one's seq
    assert.equal(seen.events[0].event.data.delta, 'a'.repeat(20));
    again.close();
  });

  test('presence: a snapshot after subscribed, then the watcher itself joins', async () => {
    const client = new GatewayClient({ url: GW_WS, token: provider(), scopes: ['conversation:c8'], presence: true,
      ...FAST });
    const seen = collect(client);
    await client.connect();
    await until(() => seen.frames.some((f) => f.type === 'presence' && !f.snapshot), 'a presence delta');
    const presence = seen.frames.filter((f) => f.type === 'presence');
    assert.equal(presence[0].snapshot, true);
    assert.equal(presence[0].scope, 'conversation:c8');
    assert.ok(seen.frames.findIndex((f) => f.type === 'subscribed') < seen.frames.indexOf(presence[0]));
    assert.deepEqual(presence[1].joined.map((m) => m.id), ['user:alice']);
    client.close();
  });

  test('a gateway restart: reconnect with backoff, resume, nothing lost or doubled', async () => {
    const client = new GatewayClient({ url: GW_WS, token: provider(), scopes: ['conversation:c6'], ...FAST });
    const seen = collect(client);
    await client.connect();
    await until(() => client.cursor !== null, 'the live start position');
    const expected = await publish('conversation:c6', { count: 5 });
    await until(() => seen.seqs.length === 5, 'five events');
    await restartGateway();
    expected.push(...await publish('conversation:c6', { count: 5 }));
    await until(() => seen.seqs.length >= 10, 'ten events');
    assert.deepEqual(seen.seqs, expected);
    assert.ok(client.connects >= 2);
    const drops = seen.notices.filter((n) => n.type === 'disconnected');
    assert.ok(drops.length >= 1 && drops.every((d) => !d.final && d.retryInMs !== null), JSON.stringify(drops));
    assert.equal(drops[0].code, 1001, 'the restart is a graceful shutdown');
    client.close();
  });

  test('token refresh before expiry keeps the connection', async () => {
    const tokens = provider({ expIn: 6 });
    const client = new GatewayClient({ url: GW_WS, token: tokens, scopes: ['conversation:c1'], refreshLeadS: 3,
      ...FAST });
    const refreshed = [];
    client.on('refreshed', (f) => refreshed.push(f));
    const welcome = await client.connect();
    await until(() => refreshed.length >= 2, 'two refreshed frames');
    assert.ok(refreshed[0].expires_at >= welcome.expires_at);
    assert.equal(client.connects, 1, 'no reconnect: the token was refreshed in time');
    assert.ok(tokens.calls >= 3, 'the provider was asked on connect and for every refresh');
    client.close();
  });

  test('without refresh (refreshLeadS 0): 4408 at expiry, then a reconnect asks the provider again', async () => {
    const tokens = provider({ expIn: 3 });
    const client = new GatewayClient({ url: GW_WS, token: tokens, scopes: ['conversation:c1'], refreshLeadS: 0,
      ...FAST });
    const seen = collect(client);
    await client.connect();
    await until(() => seen.notices.some((n) => n.type === 'disconnected' && n.code === 4408), 'close 4408');
    await until(() => client.connects >= 2, 'the reconnect');
    assert.ok(tokens.calls >= 2);
    client.close();
  });

  test('revocation: a revoked frame, then a grant restarts the scope', async () => {
    await grant('acme.conversation.r1', { members: ['user:alice'] });
    const client = new GatewayClient({ url: GW_WS, token: provider(), scopes: ['conversation:r1'], ...FAST });
    const revoked = [];
    const subscribed = [];
    client.on('revoked', (f) => revoked.push(f));
    client.on('subscribed', (f) => subscribed.push(f));
    await client.connect();
    await until(() => subscribed.length === 1, 'subscribed');
    await grant('acme.conversation.r1', { members: [] });
    await until(() => revoked.length === 1, 'revoked');
    assert.equal(revoked[0].scope, 'conversation:r1');
    await grant('acme.conversation.r1', { members: ['user:alice'] });
    await until(() => subscribed.length === 2, 'subscribed again');
    client.close();
  });

  test('4401 is final: no retry, connect() and iteration fail with GatewayClosedError', async () => {
    const tokens = provider({ bad: 'issuer' });
    const client = new GatewayClient({ url: GW_WS, token: tokens, scopes: ['conversation:c1'], ...FAST });
    const iteration = (async () => {
      for await (const _ of client.frames()) { /* drain */ }
    })();
    await assert.rejects(client.connect(), (e) => e instanceof GatewayClosedError && e.code === 4401);
    await assert.rejects(iteration, (e) => e instanceof GatewayClosedError && /wrong_issuer/.test(e.reason));
    const closed = await client.closed();
    assert.equal(closed.code, 4401);
    assert.equal(tokens.calls, 1, 'not retried');
    assert.equal(client.state, 'closed');
  });

  test('a cursor the stream cannot serve is surfaced as a gap with earliest', async () => {
    const client = new GatewayClient({ url: GW_WS, token: provider(), scopes: ['conversation:c1'], since: 10 ** 12,
      ...FAST });
    const gaps = [];
    client.on('gap', (g) => gaps.push(g));
    await client.connect();
    await until(() => gaps.length === 1, 'the gap notice');
    assert.equal(gaps[0].scope, 'conversation:c1');
    assert.equal(gaps[0].since, 10 ** 12);
    assert.ok(Number.isInteger(gaps[0].earliest) && gaps[0].earliest >= 1);
    client.close();
  });

  test('an AbortSignal closes the client and ends iteration', async () => {
    const ac = new AbortController();
    const client = new GatewayClient({ url: GW_WS, token: provider(), scopes: ['conversation:c1'], signal: ac.signal,
      ...FAST });
    const iteration = (async () => {
      const got = [];
      for await (const m of client.frames()) got.push(m.type);
      return got;
    })();
    await client.connect();
    ac.abort();
    const got = await iteration;
    assert.ok(got.includes('welcome'));
    assert.equal(await client.closed(), null);
    assert.equal(client.state, 'closed');
  });

  test('an injected WebSocket constructor is used', async () => {
    const { WebSocket } = await import('ws');
    let made = 0;
    class Counting extends WebSocket {
      constructor(...args) {
        made += 1;
        if (made === 1) throw new Error('no socket this time'); // a constructor that throws: retried
        super(...args);
      }
    }
    const client = new GatewayClient({ url: GW_HTTP, token: await token(), scopes: ['conversation:c1'],
      WebSocket: Counting, ...FAST });
    const seen = collect(client);
    await client.connect();
    assert.equal(made, 2);
    assert.equal(seen.notices[0].type, 'disconnected');
    assert.match(seen.notices[0].reason, /no socket this time/);
    client.close();
  });
});
