// Validate docs/asyncapi.yaml with npm @asyncapi/parser (tests/test_schemas.py runs it); prints one JSON
// line: {errors: [...], warnings: n, messages: n, operations: n}, exit status 1 on any error.
import { readFileSync } from 'node:fs';
import { Parser } from '@asyncapi/parser';

const path = process.argv[2];
const parser = new Parser();
const { document, diagnostics } = await parser.parse(readFileSync(path, 'utf8'));
const errors = diagnostics.filter((d) => d.severity === 0).map((d) => `${d.path.join('.')}: ${d.message}`);
const warnings = diagnostics.filter((d) => d.severity === 1).map((d) => `${d.path.join('.')}: ${d.message}`);
const out = {
  errors,
  warnings,
  messages: document ? document.allMessages().length : 0,
  operations: document ? document.allOperations().length : 0,
  version: document ? document.version() : null,
};
process.stdout.write(`${JSON.stringify(out)}\n`);
process.exit(errors.length || !document ? 1 : 0);
