/** Checks of everything a caller hands the SDK, with the gateway's own rules (generated constants). */

import { MAX_TOKEN_CHARS, RESOURCE_SCOPE_PATTERN, SCOPE_PATTERN } from "./generated/constants.js";
import { GatewayInputError } from "./errors.js";

const SCOPE_RE = new RegExp(SCOPE_PATTERN);
const RESOURCE_SCOPE_RE = new RegExp(RESOURCE_SCOPE_PATTERN);
const TOKEN_RE = /^[\x21-\x7e]+$/; // a compact JWT: visible ASCII, no spaces

/** Whether `scope` is a subscription scope: `<conversation|process|agent>:<id>` or `*`. */
export function isScope(scope: unknown): scope is string {
  return typeof scope === "string" && SCOPE_RE.test(scope);
}

/** A subscription scope (`*` allowed), or a GatewayInputError naming the rule. */
export function checkScope(scope: unknown, parameter = "scope"): string {
  if (!isScope(scope)) {
    throw new GatewayInputError(parameter, `${JSON.stringify(scope)} is not a scope: ` +
      "expected <conversation|process|agent>:<id> (id: 1-128 of A-Z a-z 0-9 _ -) or *");
  }
  return scope;
}

/** One resource scope (no `*`), as the history API wants it. */
/** A single resource's scope (`<kind>:<id>`): not `*`, not `inbox`. */
export function isResourceScope(scope: unknown): scope is string {
  return typeof scope === "string" && RESOURCE_SCOPE_RE.test(scope);
}

export function checkResourceScope(scope: unknown, parameter = "scope"): string {
  if (typeof scope !== "string" || !RESOURCE_SCOPE_RE.test(scope)) {
    throw new GatewayInputError(parameter, `${JSON.stringify(scope)} is not a scope: ` +
      "expected <conversation|process|agent>:<id> (id: 1-128 of A-Z a-z 0-9 _ -); * is not allowed here");
  }
  return scope;
}

/** A list of scopes, deduplicated in order (may be empty: subscribe later). */
export function checkScopes(scopes: unknown, parameter = "scopes"): string[] {
  if (!Array.isArray(scopes)) {
    throw new GatewayInputError(parameter, "must be an array of scopes (use [\"*\"] for everything visible)");
  }
  const out: string[] = [];
  scopes.forEach((s, i) => {
    const scope = checkScope(s, `${parameter}[${i}]`);
    if (!out.includes(scope)) out.push(scope);
  });
  return out;
}

/** A stream sequence (a cursor): a non-negative safe integer, or a string of 1-19 ASCII digits. */
export function checkSeq(value: unknown, parameter = "since"): number {
  let n: number;
  if (typeof value === "number") {
    n = value;
  } else if (typeof value === "string" && /^[0-9]{1,19}$/.test(value)) {
    n = Number(value);
  } else {
    throw new GatewayInputError(parameter, `${JSON.stringify(value)} is not a stream sequence (a non-negative integer)`);
  }
  if (!Number.isSafeInteger(n) || n < 0) {
    throw new GatewayInputError(parameter, `${JSON.stringify(value)} is not a stream sequence (a non-negative integer)`);
  }
  return n;
}

/** An integer in [lo, hi]. */
export function checkInt(value: unknown, parameter: string, lo: number, hi: number): number {
  if (typeof value !== "number" || !Number.isSafeInteger(value) || value < lo || value > hi) {
    throw new GatewayInputError(parameter, `must be an integer from ${lo} to ${hi} (got ${JSON.stringify(value)})`);
  }
  return value;
}

/** A token as the gateway reads it: a compact JWT, visible ASCII, at most 16384 characters. */
export function checkToken(token: unknown, parameter = "token"): string {
  if (typeof token !== "string" || token.length === 0 || token.length > MAX_TOKEN_CHARS || !TOKEN_RE.test(token)) {
    const what = typeof token === "string" ? `a string of ${token.length} characters` : typeof token;
    throw new GatewayInputError(parameter,
      `must be an access token (a JWT: 1-${MAX_TOKEN_CHARS} visible ASCII characters), got ${what}`);
  }
  return token;
}

/** Where a gateway is: its WebSocket, SSE and HTTP API addresses. */
export interface GatewayUrls {
  ws: URL;
  sse: URL;
  history: URL;
  scopes: URL;
}

const RESERVED_QUERY = ["scope", "since", "access_token"];

/** The gateway's addresses from `ws(s)://host[:port][/prefix]/v1/ws` or its base `http(s)://host[:port][/prefix]`. */
export function gatewayUrls(url: unknown, parameter = "url"): GatewayUrls {
  if (typeof url !== "string" && !(url instanceof URL)) {
    throw new GatewayInputError(parameter, "must be a string or a URL");
  }
  let u: URL;
  try {
    u = new URL(String(url));
  } catch {
    throw new GatewayInputError(parameter, `${JSON.stringify(String(url))} is not a URL: ` +
      "expected ws(s)://host/v1/ws or the gateway's base http(s)://host");
  }
  if (!["ws:", "wss:", "http:", "https:"].includes(u.protocol)) {
    throw new GatewayInputError(parameter, `scheme ${JSON.stringify(u.protocol)} is not supported: ` +
      "expected ws(s)://host/v1/ws or the gateway's base http(s)://host");
  }
  if (u.username || u.password) throw new GatewayInputError(parameter, "must not carry credentials (user:password@)");
  if (u.hash) throw new GatewayInputError(parameter, "must not have a #fragment");
  for (const name of RESERVED_QUERY) {
    if (u.searchParams.has(name)) {
      throw new GatewayInputError(parameter, `must not have a ${name} query parameter: pass it as an option`);
    }
  }
  const secure = u.protocol === "wss:" || u.protocol === "https:";
  let base = u.pathname.replace(/\/+$/, "");
  if (u.protocol === "ws:" || u.protocol === "wss:") {
    if (!base.endsWith("/v1/ws")) {
      throw new GatewayInputError(parameter, `a WebSocket URL must end with /v1/ws (got path ${JSON.stringify(u.pathname)})`);
    }
    base = base.slice(0, -"/v1/ws".length);
  }
  const at = (scheme: string, path: string): URL => {
    const out = new URL(u.href);
    out.protocol = scheme;
    out.pathname = base + path;
    return out;
  };
  return {
    ws: at(secure ? "wss:" : "ws:", "/v1/ws"),
    sse: at(secure ? "https:" : "http:", "/v1/sse"),
    history: at(secure ? "https:" : "http:", "/v1/history"),
    scopes: at(secure ? "https:" : "http:", "/v1/scopes"),
  };
}
