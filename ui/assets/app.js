// The console's entry point: sign-in, then hash routing between the four pages.

import { hasToken, onUnauthorized } from './api.js';
import * as auth from './auth.js';
import { failure, errorText } from './dom.js';
import { fleetPage } from './fleet.js';
import { repositoryPage } from './repository.js';
import { jobPage } from './job.js';
import { auditPage } from './audit.js';

const ROUTES = [
  { pattern: /^#\/fleet(?:\?(.*))?$/, name: 'fleet', nav: 'fleet', page: fleetPage },
  { pattern: /^#\/repositories\/([^/?]+)$/, name: 'repository', nav: 'fleet', page: repositoryPage, decode: true },
  { pattern: /^#\/jobs\/([0-9a-fA-F-]{36})$/, name: 'job', nav: null, page: jobPage },
  { pattern: /^#\/audit(?:\?(.*))?$/, name: 'audit', nav: 'audit', page: auditPage },
];
const OPERATORS = ['operator', 'admin'];

const $ = (id) => document.getElementById(id);
let me = null;
let current = null;

function showLogin(message) {
  current?.abort();
  me = null;
  $('loading').hidden = true;
  $('view').replaceChildren();
  $('nav').hidden = true;
  $('who').hidden = true;
  $('login').hidden = false;
  $('login-error').hidden = !message;
  $('login-error').textContent = message ?? '';
  $('token').focus();
}

function signedIn(who) {
  me = who;
  $('login').hidden = true;
  $('token').value = '';
  $('nav').hidden = false;
  $('who').hidden = false;
  $('who-subject').textContent = who.subject;
  $('who-role').textContent = who.role ?? 'no role';
  $('who-role').dataset.role = who.role ?? '';
}

async function route() {
  current?.abort();
  if (!me || !hasToken()) { showLogin(); return; }
  const hash = window.location.hash || '#/fleet';
  const match = ROUTES.find((r) => r.pattern.test(hash));
  if (!match) { window.location.replace('#/fleet'); return; }
  const controller = new AbortController();
  current = controller;
  const params = hash.match(match.pattern).slice(1).map((p) => (match.decode && p ? decodeURIComponent(p) : p));
  for (const link of document.querySelectorAll('[data-nav]')) {
    link.classList.toggle('current', link.dataset.nav === match.nav);
  }
  const view = $('view');
  view.replaceChildren();
  view.dataset.page = match.name;
  delete view.dataset.loaded;
  $('loading').hidden = false;
  const ctx = {
    me,
    operator: OPERATORS.includes(me.role),
    signal: controller.signal,
    navigate: (target) => { window.location.hash = target; },
  };
  try {
    await match.page(view, params, ctx);
  } catch (error) {
    if (controller.signal.aborted) return;
    view.append(failure(error));
  }
  if (controller.signal.aborted) return;
  $('loading').hidden = true;
  view.dataset.loaded = 'true';
}

async function pasted(event) {
  event.preventDefault();
  const token = $('token').value;
  if (!token.trim()) { showLogin('Paste a token first.'); return; }
  try {
    signedIn(await auth.signInWithToken(token));
    await route();
  } catch (error) {
    showLogin(`The service refused this token: ${errorText(error)}`);
  }
}

async function oidcCallback() {
  try {
    const { me: who, returnTo } = await auth.finishOidcLogin();
    window.history.replaceState(null, '', `/ui/${returnTo || '#/fleet'}`);
    signedIn(who);
    await route();
  } catch (error) {
    window.history.replaceState(null, '', '/ui/');
    showLogin(errorText(error));
  }
}

async function start() {
  $('login-token').addEventListener('submit', pasted);
  $('sign-out').addEventListener('click', () => { auth.signOut(); showLogin('Signed out.'); });
  $('login-oidc-button').addEventListener('click', () => {
    auth.startOidcLogin(window.location.hash).catch((error) => showLogin(errorText(error)));
  });
  window.addEventListener('hashchange', () => { route(); });
  onUnauthorized((error) => showLogin(`Signed out: ${errorText(error)}`));
  try {
    await auth.loadConfig();
  } catch (error) {
    showLogin(`Cannot read the console's settings: ${errorText(error)}`);
    return;
  }
  $('login-oidc').hidden = !auth.oidcEnabled();
  if (window.location.pathname === '/ui/callback') {
    await oidcCallback();
    return;
  }
  showLogin();
}

start();
