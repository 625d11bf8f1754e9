// @wsgateway/client over Server-Sent Events and the history pager, against a real gateway
// (tests/test_js_client.py starts it).
import assert from 'node:assert/strict';
import { createServer, request } from 'node:http';
import { connect } from 'node:net';
import { before, describe, test } from 'node:test';

import { GatewayClient, GatewayHttpError, GatewayInputError, history } from '../dist/index.js';
import { GW_HTTP, GW_WS, collect, grant, provider, publish, token, until } from './helpers.mjs';

const FAST = { backoff: { initialMs: 50, maxMs: 500 } };

before(async () => {
  for (const id of ['s1', 's2', 's3', 'h1']) await grant(`acme.conversation.${id}`, { members: ['user:alice'] });
});

/** A reverse proxy to the gateway that refuses WebSocket upgrades (as some corporate proxies do). */
async function upgradeRefusingProxy() {
  const target = new URL(GW_HTTP);
  const server = createServer((req, res) => {
    const up = request({ host: target.hostname, port: target.port, path: req.url, method: req.method,
      headers: req.headers }, (r) => {
      res.writeHead(r.statusCode, r.headers);
      r.pipe(res);
    });
    req.pipe(up);
    res.on('close', () => up.destroy());
  });
  server.refuseUpgrades = true;
  server.on('upgrade', (req, socket, head) => {
    if (!server.refuseUpgrades) { // pass the upgrade through to the gateway, bytes both ways
      const up = connect(Number(target.port), target.hostname, () => {
        const lines = [`${req.method} ${req.url} HTTP/1.1`];
        for (let i = 0; i < req.rawHeaders.length; i += 2) lines.push(`${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}`);
        up.write(`${lines.join('\r\n')}\r\n\r\n`);
        up.write(head);
        socket.pipe(up).pipe(socket);
      });
      up.on('error', () => socket.destroy());
      socket.on('error', () => up.destroy());
      return;
    }
    server.refused = (server.refused ?? 0) + 1;
    socket.end('HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n');
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return server;
}

describe('Server-Sent Events', { timeout: 120_000 }, () => {
  test('live events and a drop mid-stream: resume with Last-Event-ID, nothing lost or doubled', async () => {
    const client = new GatewayClient({ url: GW_HTTP, token: provider(), scopes: ['conversation:s1'],
      transport: 'sse', ...FAST });
    const seen = collect(client);
    const welcome = await client.connect();
    assert.equal(client.transport, 'sse');
    assert.equal(welcome.heartbeat_s, undefined, 'SSE welcome has no heartbeat_s');
    await until(() => client.cursor !== null, 'the live start position');
    const expected = await publish('conversation:s1', { count: 8 });
    await until(() => seen.seqs.length >= 4, 'four events');
    client.drop({ reconnectInMs: 200 });
    expected.push(...await publish('conversation:s1', { count: 8 }));
    await until(() => seen.seqs.length >= expected.length, `${expected.length} events`);
    assert.deepEqual(seen.seqs, expected);
    assert.equal(client.connects, 2);
    const resumed = seen.frames.filter((f) => f.type === 'subscribed' && f.since !== undefined);
    assert.equal(resumed.length, 1);
    assert.equal(resumed[0].recovered, true);
    client.close();
  });

  test('subscribe over SSE reconnects with the new scopes, from the cursor', async () => {
    const client = new GatewayClient({ url: GW_WS, token: provider(), scopes: ['conversation:s1'], transport: 'sse',
      ...FAST });
    const seen = collect(client);
    await client.connect();
    await until(() => client.cursor !== null, 'the live start position');
    const [first] = await publish('conversation:s1');
    await until(() => seen.seqs.includes(first), 'the first event');
    assert.equal(await client.subscribe('conversation:s2'), null);
    await until(() => client.connects === 2 && client.state === 'open', 'the reconnect');
    const [s2] = await publish('conversation:s2');
    await until(() => seen.seqs.includes(s2), 'the s2 event');
    assert.deepEqual(seen.seqs, [first, s2]);
    client.close();
  });

  test('token expiry ends the stream with close 4408; the client reconnects with a fresh token', async () => {
    const tokens = provider({ expIn: 3 });
    const client = new GatewayClient({ url: GW_HTTP, token: tokens, scopes: ['conversation:s3'], transport: 'sse',
      ...FAST });
    const seen = collect(client);
    await client.connect();
    await until(() => seen.frames.some((f) => f.type === 'close' && f.code === 4408), 'the close frame');
    await until(() => client.connects >= 2, 'the reconnect');
    assert.ok(tokens.calls >= 2);
    client.close();
  });

  test('401 is final over SSE too', async () => {
    const client = new GatewayClient({ url: GW_HTTP, token: provider({ bad: 'issuer' }), scopes: ['conversation:s1'],
      transport: 'sse', ...FAST });
    const closed = await client.start().closed();
    assert.equal(closed.code, 4401);
    assert.match(closed.reason, /wrong_issuer/);
  });

  test('"auto" falls back to SSE when WebSocket upgrades are refused', async () => {
    const proxy = await upgradeRefusingProxy();
    try {
      const url = `ws://127.0.0.1:${proxy.address().port}/v1/ws`;
      const client = new GatewayClient({ url, token: provider(), scopes: ['conversation:s1'], ...FAST });
      const seen = collect(client);
      await client.connect();
      assert.equal(client.transport, 'sse');
      assert.ok(proxy.refused >= 2, 'WebSocket was tried first');
      await until(() => client.cursor !== null, 'the live start position');
      const seqs = await publish('conversation:s1', { count: 3 });
      await until(() => seen.seqs.length === 3, 'three events');
      assert.deepEqual(seen.seqs, seqs);
      // upgrades work again (the gateway behind it restarted, a proxy was fixed): the next reconnect is a
      // WebSocket again, resumed from the cursor
      proxy.refuseUpgrades = false;
      client.drop({ reconnectInMs: 100 });
      await until(() => client.transport === 'websocket' && client.state === 'open', 'the WebSocket again');
      seqs.push(...await publish('conversation:s1', { count: 3 }));
      await until(() => seen.seqs.length === 6, 'three more events');
      assert.deepEqual(seen.seqs, seqs);
      client.close();
    } finally {
      proxy.closeAllConnections();
      proxy.close();
    }
  });
});

describe('history pager', { timeout: 60_000 }, () => {
  test('pages GET /v1/history oldest first until the end', async () => {
    const seqs = await publish('conversation:h1', { count: 7 });
    const pager = history({ url: GW_WS, token: provider(), scope: 'conversation:h1', limit: 3 });
    const pages = [];
    for await (const page of pager) pages.push(page.events.map((e) => e.seq));
    assert.deepEqual(pages, [seqs.slice(0, 3), seqs.slice(3, 6), seqs.slice(6)]);
    assert.equal(pager.cursor, seqs[6]);
    const again = [];
    for await (const e of history({ url: GW_HTTP, token: await token(), scope: 'conversation:h1', after: seqs[4] })
      .events()) {
      again.push(e.seq);
      assert.equal(e.event.scope, 'conversation:h1');
    }
    assert.deepEqual(again, seqs.slice(5));
  });

  test('a scope the user may not see: GatewayHttpError 403 forbidden', async () => {
    const pager = history({ url: GW_HTTP, token: provider(), scope: 'conversation:not-yours' });
    await assert.rejects(pager.next(), (e) => e instanceof GatewayHttpError && e.status === 403 && e.code === 'forbidden');
  });

  test('bad input is refused before any request', () => {
    assert.throws(() => history({ url: GW_HTTP, token: 't.o.k', scope: '*' }), GatewayInputError);
    assert.throws(() => history({ url: GW_HTTP, token: 't.o.k', scope: 'conversation:h1', after: 'x' }),
      (e) => e instanceof GatewayInputError && e.parameter === 'after');
    assert.throws(() => history({ url: GW_HTTP, token: 't.o.k', scope: 'conversation:h1', limit: 0 }),
      (e) => e instanceof GatewayInputError && e.parameter === 'limit');
    assert.throws(() => history({ url: 'ftp://x', token: 't.o.k', scope: 'conversation:h1' }),
      (e) => e instanceof GatewayInputError && e.parameter === 'url');
  });
});
