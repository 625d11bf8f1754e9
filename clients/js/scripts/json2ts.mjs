// JSON Schema -> TypeScript for scripts/gen_schemas.py (which owns the schemas; this only converts).
// Reads {"name": ..., "banner": ..., "schema": {...}} from stdin, writes the TypeScript to stdout.
import { compile } from 'json-schema-to-typescript';

let input = '';
for await (const chunk of process.stdin) input += chunk;
const { name, banner, schema } = JSON.parse(input);
const ts = await compile(schema, name, {
  bannerComment: banner,
  unreachableDefinitions: true,
  additionalProperties: false,
  strictIndexSignatures: false,
  format: false,
  declareExternallyReferenced: true,
  enableConstEnums: false,
  $refOptions: { resolve: { external: false } },
});
process.stdout.write(ts);
