// Signing in: a pasted token, or (when the service is configured for it) OIDC's authorization
// code flow with PKCE against the service's issuer, as a public client. Only the PKCE verifier
// and the state survive the round trip to the identity provider, in sessionStorage, and are
// removed as soon as the console is back; the tokens themselves stay in memory (api.js).

import { api, setToken, clearToken } from './api.js';

const PENDING = 'bp-console-oidc-pending';

let config = { oidc: null };

export async function loadConfig() {
  const response = await fetch('/ui/config.json', { cache: 'no-store', credentials: 'omit' });
  config = await response.json();
  return config;
}

export function oidcEnabled() { return Boolean(config.oidc); }

/** Uses `token` if the service accepts it; returns who it names (GET /v1/me). */
export async function signInWithToken(token) {
  setToken(token.trim().replace(/^Bearer\s+/i, ''));
  try {
    return await api('/v1/me');
  } catch (error) {
    clearToken();
    throw error;
  }
}

export function signOut() { clearToken(); }

function base64url(bytes) {
  let text = '';
  for (const byte of bytes) text += String.fromCharCode(byte);
  return btoa(text).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

function randomString() {
  return base64url(crypto.getRandomValues(new Uint8Array(32)));
}

async function discovery() {
  const issuer = config.oidc.issuer.replace(/\/$/, '');
  const response = await fetch(`${issuer}/.well-known/openid-configuration`, { credentials: 'omit' });
  if (!response.ok) throw new Error(`the issuer's discovery document answered ${response.status}`);
  return response.json();
}

function redirectUri() {
  return `${window.location.origin}${config.oidc.redirect_path}`;
}

/** Leaves for the identity provider; `returnTo` is the page to show once back. */
export async function startOidcLogin(returnTo) {
  const provider = await discovery();
  const verifier = randomString();
  const state = randomString();
  const digest = await crypto.subtle.digest('SHA-256', new TextEncoder().encode(verifier));
  sessionStorage.setItem(PENDING, JSON.stringify({ verifier, state, returnTo }));
  const url = new URL(provider.authorization_endpoint);
  url.search = new URLSearchParams({
    response_type: 'code',
    client_id: config.oidc.client_id,
    redirect_uri: redirectUri(),
    scope: config.oidc.scopes,
    state,
    code_challenge: base64url(new Uint8Array(digest)),
    code_challenge_method: 'S256',
  }).toString();
  window.location.assign(url.toString());
}

/**
 * Back from the identity provider at /ui/callback: checks the state, exchanges the code with
 * the verifier, signs in with the access token. Returns {me, returnTo}.
 */
export async function finishOidcLogin() {
  const params = new URLSearchParams(window.location.search);
  const pending = JSON.parse(sessionStorage.getItem(PENDING) ?? 'null');
  sessionStorage.removeItem(PENDING);
  if (params.get('error')) {
    throw new Error(`the identity provider refused: ${params.get('error')} ${params.get('error_description') ?? ''}`);
  }
  if (!pending || !params.get('code') || params.get('state') !== pending.state) {
    throw new Error('this sign-in was not started here (state mismatch): sign in again');
  }
  const provider = await discovery();
  const response = await fetch(provider.token_endpoint, {
    method: 'POST',
    credentials: 'omit',
    headers: { 'Content-Type': 'application/x-www-form-urlencoded', Accept: 'application/json' },
    body: new URLSearchParams({
      grant_type: 'authorization_code',
      code: params.get('code'),
      redirect_uri: redirectUri(),
      client_id: config.oidc.client_id,
      code_verifier: pending.verifier,
    }),
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok || !answer.access_token) {
    throw new Error(`the token endpoint answered ${response.status}: ${answer.error ?? ''} ${answer.error_description ?? ''}`);
  }
  const me = await signInWithToken(answer.access_token);
  return { me, returnTo: pending.returnTo };
}
