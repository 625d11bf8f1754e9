"""The HTTP/WebSocket edge: the uvicorn transport seam, the WebSocket session, the HTTP read APIs and SSE."""
