// @wsgateway/client/ag-ui (GatewayAgent) in headless Debian Chromium (tests/test_js_client.py), no bundler:
// the built ESM (clients/js/dist: the gateway's /static/sdk has no ag-ui.js) and its peer dependencies from
// clients/js/node_modules, resolved by an import map, on the gateway's origin (routes of this driver), with
// the browser's own WebSocket and fetch against a real gateway.
//
// Every peer dependency of @ag-ui/client loads as ESM through the import map except rxjs 7: its ESM builds
// import extensionless relative paths ('./internal/Observable'), which a browser cannot resolve. rxjs is
// loaded from its own UMD bundle (dist/bundles/rxjs.umd.js, a classic script) and re-exported to the import
// map by a two-line module per entry point (`rxjs`, `rxjs/operators`), its names taken from rxjs itself.
//
// Usage: node tests/browser/agui.mjs '<json config>'
//   {"gateway": "http://127.0.0.1:<port>", "control": "http://127.0.0.1:<port>", "scope": "conversation:..."}
//
// The scenario of clients/js/test/ag-ui.test.mjs: a run already going (a message half written, a state), the
// agent attaches (`connectAgent()`: @ag-ui/client's verifier and state-applying pipeline) and gets the prelude,
// a live delta, a drop in the middle of the message, the rest of the run. Prints one JSON line: the AG-UI
// event types in order, the agent's messages and state, drops, and whether connectAgent() resolved.

import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { extname, join, normalize } from 'node:path';
import process from 'node:process';

import { main } from './chromium.mjs';

const config = JSON.parse(process.argv[2] ?? '{}');
const T = 30000; // hang guard, not a speed threshold
const JS = new URL('../../clients/js/', import.meta.url).pathname;
const NM = join(JS, 'node_modules');
const requireJs = createRequire(join(JS, 'package.json'));

async function control(path, body) {
  const r = await fetch(`${config.control}${path}`, body === undefined ? {} : {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body),
  });
  if (r.status !== 200) throw new Error(`${path}: HTTP ${r.status} ${await r.text()}`);
  return r.json();
}
const send = async (type, runId, data) => (await control('/publish', { scope: config.scope, type, run_id: runId, data })).seqs[0];

const IMPORTS = {
  '@ag-ui/client': '/agui-test/nm/@ag-ui/client/dist/index.mjs',
  '@ag-ui/core': '/agui-test/nm/@ag-ui/core/dist/index.mjs',
  '@ag-ui/core/schemas': '/agui-test/nm/@ag-ui/core/dist/schemas.mjs',
  '@ag-ui/proto': '/agui-test/nm/@ag-ui/proto/dist/index.mjs',
  '@bufbuild/protobuf/wire': '/agui-test/nm/@bufbuild/protobuf/dist/esm/wire/index.js',
  'compare-versions': '/agui-test/nm/compare-versions/lib/esm/index.js',
  'fast-json-patch': '/agui-test/nm/fast-json-patch/index.mjs',
  'untruncate-json': '/agui-test/nm/untruncate-json/dist/esm/index.js',
  uuid: '/agui-test/nm/uuid/dist/esm-browser/index.js',
  'zod/v4': '/agui-test/nm/zod/v4/index.js',
  rxjs: '/agui-test/rxjs.mjs',
  'rxjs/operators': '/agui-test/rxjs-operators.mjs',
};
const shim = (names, from) => `const m = ${from};\nexport const { ${names.join(', ')} } = m;\n`;
const GENERATED = {
  '/agui-test/rxjs.mjs': ['text/javascript', shim(Object.keys(requireJs('rxjs')), 'globalThis.rxjs')],
  '/agui-test/rxjs-operators.mjs': ['text/javascript',
    shim(Object.keys(requireJs('rxjs/operators')), 'globalThis.rxjs.operators')],
};
const TYPES = { '.js': 'text/javascript', '.mjs': 'text/javascript' };

await main(config, async (page) => {
  const consoleErrors = { refusal: 0, unexpected: [] };
  let refusing = false;
  page.on('console', (m) => {
    if (m.type() !== 'error') return;
    if (refusing && /^Agent execution failed: AGUIError: Cannot send 'TEXT_MESSAGE_CONTENT'/.test(m.text())) {
      consoleErrors.refusal += 1;
    } else consoleErrors.unexpected.push(`console: ${m.text()}`);
  });
  const served = [];
  await page.route(`${config.gateway}/agui-test/**`, async (route) => {
    const path = new URL(route.request().url()).pathname;
    served.push(path);
    if (GENERATED[path]) {
      const [contentType, body] = GENERATED[path];
      return route.fulfill({ status: 200, contentType, body });
    }
    const [root, rest] = path.startsWith('/agui-test/nm/') ? [NM, path.slice(14)]
      : path.startsWith('/agui-test/dist/') ? [join(JS, 'dist'), path.slice(16)] : [null, null];
    const file = root && normalize(join(root, rest));
    if (!file || !file.startsWith(`${root}/`) || !TYPES[extname(file)]) return route.fulfill({ status: 404, body: '' });
    try {
      return route.fulfill({ status: 200, contentType: TYPES[extname(file)], body: readFileSync(file) });
    } catch {
      return route.fulfill({ status: 404, body: '' });
    }
  });
  await page.route('**/favicon.ico', (route) => route.fulfill({ status: 204 }));
  await page.exposeFunction('freshToken', async () => (await control('/token?sub=alice')).token);

  // a run already going: a user message, the run, half an answer, a state
  await send('conversation.message.created', undefined, { message_id: 'm-0', role: 'user', content: 'Hi' });
  await send('run.started', 'run-1', {});
  await send('run.message.started', 'run-1', { message_id: 'm-1' });
  await send('run.message.delta', 'run-1', { message_id: 'm-1', delta: 'Hel' });
  await send('run.state.snapshot', 'run-1', { state: { step: 1 } });

  // A document of the gateway itself (one fulfilled by a route has no address space, and Chromium's local
  // network access checks would block its connections to 127.0.0.1), then the import map (before any
  // module is loaded) and rxjs's UMD bundle.
  await page.goto(`${config.gateway}/healthz`, { waitUntil: 'load' });
  await page.evaluate(async (imports) => {
    const map = document.createElement('script');
    map.type = 'importmap';
    map.textContent = JSON.stringify({ imports });
    document.head.append(map);
    await new Promise((resolve, reject) => {
      const umd = document.createElement('script');
      umd.src = '/agui-test/nm/rxjs/dist/bundles/rxjs.umd.js';
      umd.onload = resolve;
      umd.onerror = () => reject(new Error('rxjs.umd.js did not load'));
      document.head.append(umd);
    });
  }, IMPORTS);
  await page.evaluate(async (scope) => {
    const { GatewayAgent } = await import('/agui-test/dist/ag-ui.js');
    const agent = new GatewayAgent({
      url: location.origin, token: () => window.freshToken(), scope,
      client: { transport: 'websocket', backoff: { initialMs: 10, maxMs: 50 } },
    });
    window.agent = agent;
    window.seen = [];
    window.finished = false;
    window.drops = 0;
    agent.subscribe({
      onEvent: ({ event }) => { window.seen.push(event); },
      onRunFinishedEvent: () => { window.finished = true; },
    });
    window.attached = agent.connectAgent().then(() => 'resolved', (e) => `rejected: ${e?.stack ?? e}`);
  }, config.scope);
  const wait = async (what, fn, arg) => {
    try {
      await page.waitForFunction(fn, arg, { timeout: T, polling: 20 });
    } catch (e) {
      e.extra = { waitingFor: what, seen: await page.evaluate(() => window.seen.map((ev) => ev.type)), served };
      throw e;
    }
  };
  await wait('the prelude', () => window.seen.some((e) => e.type === 'TEXT_MESSAGE_START'));
  await send('run.message.delta', 'run-1', { message_id: 'm-1', delta: 'lo' });
  await wait('the live delta', () => window.seen.some((e) => e.delta === 'lo'));
  await page.evaluate(() => {
    window.agent.client.on('disconnected', () => { window.drops += 1; });
    window.agent.client.drop({ reconnectInMs: 50 }); // in the middle of the message
  });
  await send('run.message.delta', 'run-1', { message_id: 'm-1', delta: ', world' });
  await send('run.state.delta', 'run-1', { patch: [{ op: 'replace', path: '/step', value: 2 }] });
  await send('run.message.finished', 'run-1', { message_id: 'm-1' });
  await send('run.finished', 'run-1', { outcome: 'success' });
  await wait('RUN_FINISHED', () => window.finished);
  const result = await page.evaluate(async () => {
    const { agent } = window;
    await agent.detachActiveRun();
    return {
      attached: await window.attached, types: window.seen.map((e) => e.type), messages: agent.messages,
      state: agent.state, threadId: agent.threadId, drops: window.drops, connects: agent.client.connects,
      transport: agent.client.transport, nativeWebSocket: typeof WebSocket === 'function',
      rxjsFromUmd: typeof globalThis.rxjs?.Observable === 'function',
    };
  });
  // the verifier the check above relies on is at work in this page: an out-of-order stream is refused
  // (@ag-ui/client logs that refusal as a console error: the one expected)
  refusing = true;
  result.outOfOrder = await page.evaluate(async () => {
    const { AbstractAgent } = await import('@ag-ui/client');
    const { from } = await import('rxjs');
    class Replay extends AbstractAgent {
      run() { throw new Error('replay only connects'); }
      connect() {
        return from([{ type: 'RUN_STARTED', threadId: 't', runId: 'r' },
          { type: 'TEXT_MESSAGE_CONTENT', messageId: 'm', delta: 'x' }]);
      }
    }
    return new Replay({ threadId: 't' }).connectAgent().then(() => 'resolved', (e) => String(e));
  });
  refusing = false;
  return { ...result, consoleErrors };
}, { consoleErrorsAreProblems: false });
