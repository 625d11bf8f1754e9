// Headless Debian Chromium through playwright-core, shared by the browser drivers (viewer.mjs, cors.mjs).
//
// The npm dependencies live in <repo>/tools/node_modules (scripts/ensure-npm.sh), not next to this
// file, and ESM ignores NODE_PATH: resolve playwright-core from the tools directory explicitly.

import { mkdtempSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const toolsDir = new URL('../../tools/', import.meta.url).pathname;
const resolved = createRequire(`${toolsDir}package.json`).resolve('playwright-core');
const playwright = await import(pathToFileURL(resolved).href);
const { chromium } = playwright.chromium ? playwright : playwright.default; // CommonJS entry point

// A fresh profile per run, nothing from the network: every page comes from a local server.
export async function launch(config) {
  const profile = mkdtempSync(join(tmpdir(), 'wsgateway-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: config.chromium ?? '/usr/bin/chromium',
    headless: true,
    viewport: { width: config.width ?? 1440, height: config.height ?? 900 },
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage',
    ],
  });
  const close = async () => {
    await context.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
  };
  return { context, close };
}

// Runs `body(page, problems)` in a fresh browser and prints one JSON line: its result plus `problems`
// (page errors and console errors, unless `body` collects console messages itself), or `error`.
export async function main(config, body, { consoleErrorsAreProblems = true } = {}) {
  const problems = [];
  let result;
  let code = 0;
  let close = async () => {};
  try {
    const launched = await launch(config);
    close = launched.close;
    const page = launched.context.pages()[0] ?? (await launched.context.newPage());
    page.on('pageerror', (e) => problems.push(`pageerror: ${e.message}`));
    if (consoleErrorsAreProblems) {
      page.on('console', (m) => { if (m.type() === 'error') problems.push(`console: ${m.text()}`); });
    }
    result = await body(page, launched.context);
  } catch (e) {
    result = { error: String(e.stack || e), ...(e.extra ?? {}) };
    code = 1;
  } finally {
    await close();
  }
  process.stdout.write(`${JSON.stringify({ ...result, problems })}\n`);
  process.exit(code);
}
