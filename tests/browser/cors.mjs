// Calls the gateway's read APIs from pages of other origins in headless Debian Chromium (tests/test_cors.py).
//
// Usage: node tests/browser/cors.mjs '<json config>'
//   {"gateway": "http://127.0.0.1:<port>", "token": "<jwt>", "scope": "conversation:c1", "seq": 1,
//    "pages": {"listed": "http://127.0.0.1:<p1>/", "other": "http://127.0.0.1:<p2>/"}}
//
// For each page (served by the test on its own port, so a different origin than the gateway's), from
// inside the page: fetch GET /v1/history and /v1/scopes with an Authorization header (preflighted),
// fetch GET /v1/sse with Authorization and Last-Event-ID (preflighted; read up to the first event), and
// open an EventSource on /v1/sse?since=...&access_token=... (a simple request: CORS decides whether the
// page may read it). Prints one JSON line per page with what worked, what failed and the console's
// messages (Chromium names the CORS policy when it blocks a response).

import process from 'node:process';

import { main } from './chromium.mjs';

const config = JSON.parse(process.argv[2] ?? '{}');
const T = 15000; // hang guard of one probe inside the page

async function probe(page, url) {
  const consoleLines = [];
  const onConsole = (m) => consoleLines.push(`${m.type()}: ${m.text()}`);
  page.on('console', onConsole);
  await page.goto(url, { waitUntil: 'load' });
  const result = await page.evaluate(async ({ gateway, token, scope, seq, T }) => {
    const guard = (what, promise) => Promise.race([promise, new Promise((_, fail) =>
      setTimeout(() => fail(new Error(`${what}: no answer within ${T} ms`)), T))]);
    const auth = { Authorization: `Bearer ${token}` };
    const q = encodeURIComponent(scope);
    const out = { origin: location.origin };

    try {
      const r = await guard('history', fetch(`${gateway}/v1/history?scope=${q}&limit=10`, { headers: auth }));
      out.history = { status: r.status, seqs: (await r.json()).events.map((e) => e.seq) };
    } catch (e) {
      out.history = { error: String(e) };
    }

    try {
      const r = await guard('scopes', fetch(`${gateway}/v1/scopes`, { headers: auth }));
      const body = await r.json();
      out.scopes = { status: r.status, principal: body.principal };
    } catch (e) {
      out.scopes = { error: String(e) };
    }

    try { // Last-Event-ID is what an EventSource sends when it reconnects: resume just before `seq`
      const ctl = new AbortController();
      const r = await guard('sse fetch', fetch(`${gateway}/v1/sse?scope=${q}`,
        { headers: { ...auth, 'Last-Event-ID': String(seq - 1) }, signal: ctl.signal }));
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let text = '';
      while (!/\nid: \d+\n/.test(text)) {
        const { value, done } = await guard('sse fetch body', reader.read());
        if (done) break;
        text += decoder.decode(value, { stream: true });
      }
      ctl.abort();
      out.sseFetch = { status: r.status, firstId: Number((text.match(/\nid: (\d+)\n/) || [])[1]) };
    } catch (e) {
      out.sseFetch = { error: String(e) };
    }

    try {
      out.eventSource = await guard('EventSource', new Promise((resolve) => {
        const es = new EventSource(`${gateway}/v1/sse?scope=${q}&since=${seq - 1}&access_token=${token}`);
        let welcome = false;
        es.addEventListener('welcome', () => { welcome = true; });
        es.onmessage = (m) => {
          es.close();
          resolve({ welcome, lastEventId: m.lastEventId, seq: JSON.parse(m.data).seq });
        };
        es.onerror = () => { // CLOSED: the browser gave up (CORS); CONNECTING would be a retry
          if (es.readyState === EventSource.CLOSED) resolve({ welcome, error: 'closed', readyState: es.readyState });
        };
      }));
    } catch (e) {
      out.eventSource = { error: String(e) };
    }
    return out;
  }, { gateway: config.gateway, token: config.token, scope: config.scope, seq: config.seq, T });
  page.off('console', onConsole);
  return { ...result, console: consoleLines };
}

await main(config, async (page) => {
  const out = {};
  for (const [name, url] of Object.entries(config.pages)) out[name] = await probe(page, url);
  return out;
}, { consoleErrorsAreProblems: false });
