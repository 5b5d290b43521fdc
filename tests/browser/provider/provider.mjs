// A real OpenID Connect provider for the console's browser tests (npm's oidc-provider 9.x): the
// authorization code flow with PKCE, signed id_tokens and a JWKS, and its own login page. Not a
// mock: the console signs in against it exactly as against Keycloak, Entra ID or Okta.
//
//   node provider.mjs REDIRECT_URI CLIENT_ID CLIENT_SECRET
//
// Listens on 127.0.0.1 on a free port and prints one JSON line, {"issuer": ...}, once it serves.
// Accounts: the login is the account; its groups come from ACCOUNTS (any password: the test
// provider's login page is oidc-provider's development one).
import http from 'node:http';
import Provider from 'oidc-provider';

const [redirectUri, clientId, clientSecret] = process.argv.slice(2);
if (!redirectUri || !clientId || !clientSecret) {
  console.error('usage: node provider.mjs REDIRECT_URI CLIENT_ID CLIENT_SECRET');
  process.exit(2);
}

const ACCOUNTS = {
  steward: { name: 'Dana Steward', groups: ['fibemrss-stewards'] },
  auditor: { name: 'Ari Auditor', groups: ['fibemrss-auditors'] },
  visitor: { name: 'Vic Visitor', groups: ['cafeteria'] },
  operator: { name: 'Olu Operator', groups: ['fibemrss-operators'] },
};

const server = http.createServer();
server.listen(0, '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, {
    clients: [{
      client_id: clientId,
      client_secret: clientSecret,
      redirect_uris: [redirectUri],
      grant_types: ['authorization_code'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
    }],
    scopes: ['openid', 'profile', 'groups'],
    claims: { openid: ['sub'], profile: ['name'], groups: ['groups'] },
    // The console reads the person's name and groups from the id_token itself.
    conformIdTokenClaims: false,
    cookies: { keys: ['fibemrss-test-provider-cookie-key'] },
    async findAccount(ctx, id) {
      const account = ACCOUNTS[id];
      if (!account) return undefined;
      return { accountId: id, async claims() { return { sub: id, ...account }; } };
    },
    // The console is a first-party client: no consent screen, as a hospital's IdP would set it.
    async loadExistingGrant(ctx) {
      const grantId = ctx.oidc.result?.consent?.grantId
        || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
      if (grantId) return ctx.oidc.provider.Grant.find(grantId);
      const grant = new ctx.oidc.provider.Grant({
        clientId: ctx.oidc.client.clientId,
        accountId: ctx.oidc.session.accountId,
      });
      grant.addOIDCScope('openid profile groups');
      grant.addOIDCClaims(['name', 'groups']);
      await grant.save();
      return grant;
    },
  });
  server.on('request', provider.callback());
  process.stdout.write(`${JSON.stringify({ issuer })}\n`);
});
process.on('SIGTERM', () => process.exit(0));
