// A real OpenID provider (the npm `oidc-provider` package) for the wsgateway test-suite.
//
// Why: the gateway must accept access tokens from a standards-compliant IdP, not only from the
// hand-rolled test IdP. This issues RFC 9068-style JWT access tokens through the OAuth 2.0
// client_credentials grant, with Resource Indicators (RFC 8707) so the token's `aud` is the
// configured resource and `extraTokenClaims` adding the `tenant`/`groups` claims the gateway needs.
//
// Usage: node tests/oidc/server.mjs '<json config>'
//   {"port": 1234, "audience": "urn:wsgateway", "clientId": "gw", "clientSecret": "...",
//    "tenant": "acme", "groups": ["ops"], "alg": "ES256", "ttlS": 300, "toolsDir": "<repo>/tools"}
// Prints one line `listening <issuer>` on stdout once it accepts connections, and exits when its
// stdin closes (so a dying parent never leaves it behind). Loopback only; no network access needed.

import { generateKeyPairSync, randomUUID } from 'node:crypto';
import { createRequire } from 'node:module';
import process from 'node:process';
import { pathToFileURL } from 'node:url';

const config = JSON.parse(process.argv[2] ?? '{}');

// The npm dependencies live in <repo>/tools/node_modules (scripts/ensure-npm.sh), not next to this
// file, and ESM ignores NODE_PATH: resolve the package from the tools directory explicitly.
const toolsDir = config.toolsDir ?? new URL('../../tools/', import.meta.url).pathname;
const resolved = createRequire(`${toolsDir.replace(/\/$/, '')}/package.json`).resolve('oidc-provider');
const { default: Provider } = await import(pathToFileURL(resolved).href);
const port = Number(config.port);
if (!Number.isInteger(port) || port <= 0) {
  console.error('server.mjs: config.port is required');
  process.exit(2);
}
const issuer = `http://127.0.0.1:${port}`;
const audience = config.audience ?? 'urn:wsgateway';
const alg = config.alg ?? 'ES256';
const ttlS = config.ttlS ?? 300;
const scope = 'events:read';

// Fresh signing keys at every start, exported as private JWKs for the provider's keystore.
function signingKey(keyAlg) {
  const pair = keyAlg === 'RS256'
    ? generateKeyPairSync('rsa', { modulusLength: 2048 })
    : generateKeyPairSync('ec', { namedCurve: 'P-256' });
  return { ...pair.privateKey.export({ format: 'jwk' }), kid: randomUUID(), alg: keyAlg, use: 'sig' };
}

const provider = new Provider(issuer, {
  clients: [{
    client_id: config.clientId ?? 'wsgateway-test',
    client_secret: config.clientSecret ?? 'wsgateway-test-secret',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
    scope,
  }],
  jwks: { keys: [signingKey('RS256'), ...(alg === 'RS256' ? [] : [signingKey(alg)])] },
  scopes: [scope],
  cookies: { keys: [randomUUID()] },
  ttl: { ClientCredentials: ttlS },
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => audience,
      useGrantedResource: () => true,
      getResourceServerInfo: (_ctx, resourceIndicator) => {
        if (resourceIndicator !== audience) {
          throw new Provider.errors.InvalidTarget(`unknown resource ${resourceIndicator}`);
        }
        return {
          scope,
          audience,
          accessTokenTTL: ttlS,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg } },
        };
      },
    },
  },
  extraTokenClaims: () => ({ tenant: config.tenant ?? 'acme', groups: config.groups ?? [] }),
});
provider.on('server_error', (_ctx, err) => console.error('server_error', err));

const server = provider.listen(port, '127.0.0.1', () => {
  console.log(`listening ${issuer}`);
});

function stop() {
  server.close();
  process.exit(0);
}
process.stdin.on('end', stop);
process.stdin.on('error', stop);
process.stdin.resume();
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
