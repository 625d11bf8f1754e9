/** Errors of the SDK: bad input (thrown before anything is sent), a final close, an HTTP error answer. */

/** Bad input to the SDK (a URL, scope, cursor or token the gateway would refuse): thrown synchronously,
 * before anything is sent. `parameter` names what was wrong. */
export class GatewayInputError extends TypeError {
  readonly parameter: string;

  constructor(parameter: string, message: string) {
    super(`${parameter}: ${message}`);
    this.name = "GatewayInputError";
    this.parameter = parameter;
  }
}

/** The gateway refused the session for good: close code 4400 (bad request) or 4401 (unauthorized), or
 * the HTTP 400/401 of an SSE stream. Not retried. */
export class GatewayClosedError extends Error {
  readonly code: number;
  readonly reason: string;

  constructor(code: number, reason: string) {
    super(`gateway closed the session with ${code}: ${reason}`);
    this.name = "GatewayClosedError";
    this.code = code;
    this.reason = reason;
  }
}

/** An error answer of the HTTP API (`{"error": {"code", "message"}}`), e.g. 403 `forbidden`. */
export class GatewayHttpError extends Error {
  readonly status: number;
  readonly code: string;

  constructor(status: number, code: string, message: string) {
    super(`HTTP ${status} ${code}: ${message}`);
    this.name = "GatewayHttpError";
    this.status = status;
    this.code = code;
  }
}
