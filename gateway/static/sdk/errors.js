/** Errors of the SDK: bad input (thrown before anything is sent), a final close, an HTTP error answer. */
/** Bad input to the SDK (a URL, scope, cursor or token the gateway would refuse): thrown synchronously,
 * before anything is sent. `parameter` names what was wrong. */
export class GatewayInputError extends TypeError {
    parameter;
    constructor(parameter, message) {
        super(`${parameter}: ${message}`);
        this.name = "GatewayInputError";
        this.parameter = parameter;
    }
}
/** The gateway refused the session for good: close code 4400 (bad request) or 4401 (unauthorized), or
 * the HTTP 400/401 of an SSE stream. Not retried. */
export class GatewayClosedError extends Error {
    code;
    reason;
    constructor(code, reason) {
        super(`gateway closed the session with ${code}: ${reason}`);
        this.name = "GatewayClosedError";
        this.code = code;
        this.reason = reason;
    }
}
/** An error answer of the HTTP API (`{"error": {"code", "message"}}`), e.g. 403 `forbidden`. */
export class GatewayHttpError extends Error {
    status;
    code;
    constructor(status, code, message) {
        super(`HTTP ${status} ${code}: ${message}`);
        this.name = "GatewayHttpError";
        this.status = status;
        this.code = code;
    }
}
