"""Development-mode tooling, never used in production: `wsgateway dev` (dev), the insecure development
identity provider (devidp), the simulated agent platform (simulator) and nats-server child processes
(natsproc, also used by the tests and benchmarks)."""
