// @wsgateway/client in headless Debian Chromium (tests/test_js_client.py): the built ESM the gateway
// serves (/static/sdk/index.js, the SDK the live viewer uses), the browser's own WebSocket, a real gateway.
//
// Usage: node tests/browser/sdk.mjs '<json config>'
//   {"gateway": "http://127.0.0.1:<port>", "control": "http://127.0.0.1:<port>", "scope": "conversation:b1"}
//
// In the page: a GatewayClient with a token provider (tokens from the test's control API, fetched by this
// driver), live events, then a drop mid-stream (reconnect 300 ms later) while events keep being published;
// prints one JSON line: the seqs the page received, the seqs published, connects, duplicates, transport.

import process from 'node:process';

import { main } from './chromium.mjs';

const config = JSON.parse(process.argv[2] ?? '{}');
const T = 30000; // hang guard

async function control(path, body) {
  const r = await fetch(`${config.control}${path}`, body === undefined ? {} : {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body),
  });
  if (r.status !== 200) throw new Error(`${path}: HTTP ${r.status} ${await r.text()}`);
  return r.json();
}
const publish = async (count) => (await control('/publish', { scope: config.scope, count, number: true })).seqs;

await main(config, async (page) => {
  let tokens = 0;
  await page.exposeFunction('freshToken', async () => {
    tokens += 1;
    return (await control('/token?sub=alice')).token;
  });
  await page.route('**/favicon.ico', (route) => route.fulfill({ status: 204 })); // the gateway has none
  await page.goto(`${config.gateway}/healthz`, { waitUntil: 'load' });
  await page.evaluate(async (scope) => {
    const sdk = await import('/static/sdk/index.js');
    const url = new URL('/v1/ws', location.href);
    url.protocol = 'ws:';
    const client = new sdk.GatewayClient({
      url: url.href, token: () => window.freshToken(), scopes: [scope], backoff: { initialMs: 50, maxMs: 500 },
    });
    window.seen = [];
    window.client = client;
    client.on('event', (f) => window.seen.push(f.seq));
    await client.connect();
    window.nativeWebSocket = typeof WebSocket === 'function';
  }, config.scope);
  const wait = (fn, arg) => page.waitForFunction(fn, arg, { timeout: T });
  await wait(() => window.client.cursor !== null);
  const published = await publish(5);
  await wait((n) => window.seen.length >= n, 3);
  await page.evaluate(() => window.client.drop({ reconnectInMs: 300 }));
  published.push(...await publish(10));
  await wait((n) => window.seen.length >= n && window.client.state === 'open', published.length);
  published.push(...await publish(3));
  await wait((n) => window.seen.length >= n, published.length);
  const result = await page.evaluate(() => ({
    seen: window.seen, connects: window.client.connects, duplicates: window.client.duplicates,
    transport: window.client.transport, nativeWebSocket: window.nativeWebSocket, cursor: window.client.cursor,
  }));
  await page.evaluate(() => window.client.close());
  return { ...result, published, tokens };
});
