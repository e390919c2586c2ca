// piecework's console: a page over the API, served by the api itself. It reads and changes
// nothing the API does not: every call carries the API key the user logged in with (kept for
// this tab only, in sessionStorage), and the key's role decides what it may do. Text from
// the API is always set as text, never as HTML.

const KEY = 'piecework.key';
const main = document.getElementById('main');
let whoami = null;
let refresh = null; // the live page's timer

// ---- the API ----------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const key = sessionStorage.getItem(KEY);
  const headers = { ...(options.headers ?? {}) };
  if (key) headers.authorization = `Bearer ${key}`;
  if (options.json !== undefined) {
    headers['content-type'] = 'application/json';
    options = { ...options, body: JSON.stringify(options.json) };
  }
  const response = await fetch(path, { ...options, headers });
  const type = response.headers.get('content-type') ?? '';
  const body = type.includes('json') ? await response.json() : await response.text();
  if (!response.ok) {
    if (response.status === 401) {
      sessionStorage.removeItem(KEY);
      showLogin(key ? 'That key was refused: log in again.' : undefined);
    }
    throw new ApiError(response.status, body?.error?.message ?? `${response.status} ${response.statusText}`);
  }
  return body;
}

/** Whether the logged-in key's role may do `permission` (as the API says in /v1/whoami). */
const may = (permission) => whoami?.permissions?.includes(permission) ?? false;

// ---- building the page ------------------------------------------------------------------

/** An element: `h('a', {href: '#/'}, 'text', child, …)`; text is always text. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on')) el.addEventListener(name.slice(2), value);
    else if (name === 'dataset') Object.assign(el.dataset, value);
    else el.setAttribute(name, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

const badge = (status) => h('span', { class: `badge ${status}`, 'data-status': status }, status);
const when = (time) => (time ? new Date(time).toLocaleString() : '—');
const json = (value) => h('pre', {}, JSON.stringify(value, null, 2));
const errorBox = (message) => h('div', { class: 'error', role: 'alert' }, message);

function duration(from, to) {
  if (!from || !to) return '—';
  return ms(new Date(to) - new Date(from));
}

function ms(value) {
  if (value < 1000) return `${value} ms`;
  if (value < 60000) return `${(value / 1000).toFixed(1)} s`;
  return `${Math.round(value / 60000)} min`;
}

function show(...children) {
  main.replaceChildren(...children.filter((child) => child !== null && child !== undefined && child !== false));
}

function table(headers, rows, empty = 'Nothing yet.') {
  if (rows.length === 0) return h('p', { class: 'muted' }, empty);
  return h('table', {}, h('thead', {}, h('tr', {}, headers.map((x) => h('th', {}, x)))), h('tbody', {}, rows));
}

/** Runs `action` from a button, showing its error next to it; refreshes the page after. */
function act(label, action, { kind = '', confirmText } = {}) {
  const button = h('button', { class: kind, type: 'button' }, label);
  button.addEventListener('click', async () => {
    if (confirmText && !confirm(confirmText)) return;
    button.disabled = true;
    try {
      await action();
      route();
    } catch (err) {
      button.after(errorBox(err.message));
      button.disabled = false;
    }
  });
  return button;
}

// ---- pages --------------------------------------------------------------------------------

async function overviewPage() {
  const since = new URLSearchParams(location.hash.split('?')[1] ?? '').get('since') ?? '24h';
  const [stats, flows, metrics] = await Promise.all([
    api(`/v1/stats?since=${encodeURIComponent(since)}`),
    api('/v1/flows'),
    api('/metrics').catch(() => ''),
  ]);
  const health = stats.health;
  const attempts = stats.flows.reduce((n, f) => n + f.attempts, 0);
  const failed = stats.flows.reduce((n, f) => n + f.failed, 0);
  const runs = stats.flows.reduce((n, f) => n + f.runs_succeeded + f.runs_failed, 0);
  const runsFailed = stats.flows.reduce((n, f) => n + f.runs_failed, 0);
  const rate = (f) => `${(f.error_rate * 100).toFixed(1)}%`;
  const figureRows = (list, link) =>
    list.map((f) =>
      h('tr', {},
        h('td', {}, h('a', { href: link(f.name) }, f.name)),
        h('td', {}, f.attempts),
        h('td', {}, f.failed),
        h('td', {}, rate(f)),
        h('td', {}, f.retries),
        h('td', {}, ms(f.p50_ms)),
        h('td', {}, ms(f.p95_ms)),
        h('td', {}, ms(f.p99_ms))));
  const heads = ['', 'executions', 'failed', 'error rate', 'retries', 'p50', 'p95', 'p99'];
  show(
    h('div', { class: 'row' }, h('h1', { class: 'grow' }, 'Overview'), sinceSelect(since, (value) => (location.hash = `#/?since=${value}`))),
    h('div', { class: 'cards' },
      card('Flows enabled', `${flows.flows.filter((f) => f.enabled).length} / ${flows.flows.length}`),
      card('Runs ended', runs),
      card('Runs failed', runsFailed),
      card('Step executions', attempts),
      card('Error rate', attempts ? `${((failed / attempts) * 100).toFixed(1)}%` : '—'),
      card('Pieces unhealthy', health.filter((x) => !x.healthy).length)),
    stats.truncated ? h('p', { class: 'muted' }, `Figures cover the first ${stats.attempts} executions of the window.`) : null,
    h('h2', {}, 'Per flow'),
    table(heads.map((x, i) => (i ? x : 'flow')), figureRows(stats.flows, (n) => `#/flows/${encodeURIComponent(n)}`), 'No executions in this window.'),
    h('h2', {}, 'Per piece'),
    table(heads.map((x, i) => (i ? x : 'piece')), figureRows(stats.pieces, (n) => `#/pieces/${encodeURIComponent(n)}`), 'No executions in this window.'),
    h('h2', {}, 'Adoption'),
    table(['piece', 'enabled flows using it'], Object.entries(adoptionOf(metrics)).sort((a, b) => b[1] - a[1]).map(([piece, flows]) =>
      h('tr', {}, h('td', {}, h('a', { href: `#/pieces/${encodeURIComponent(piece)}` }, piece)), h('td', {}, flows))), 'No enabled flow uses a piece yet.'),
    h('h2', {}, 'Health checks'),
    table(['piece', 'flow', 'status', 'checked'], health.map((x) => h('tr', {}, h('td', {}, x.piece), h('td', {}, h('a', { href: `#/flows/${encodeURIComponent(x.flow)}` }, x.flow)), h('td', {}, badge(x.healthy ? 'healthy' : 'unhealthy'), x.healthy ? '' : h('span', { class: 'muted' }, ` ${x.status}`)), h('td', {}, when(x.checked_at)))),
      'No health-check flow has run (see docs/private-pieces.md §10).'),
  );
}

function card(label, value) {
  return h('div', { class: 'card' }, h('div', { class: 'muted' }, label), h('div', { class: 'figure' }, value));
}

function sinceSelect(value, onchange) {
  const select = h('select', { 'aria-label': 'since', onchange: (e) => onchange(e.target.value) },
    ['15m', '1h', '24h', '7d', '30d'].map((x) => h('option', { value: x, selected: x === value }, `last ${x}`)));
  return select;
}

/** The samples of metric `name` in a Prometheus text: `[{labels, value}]`. */
function samples(metrics, name) {
  const found = [];
  for (const line of String(metrics).split('\n')) {
    if (!line.startsWith(`${name}{`)) continue;
    const m = /^[^{]+\{([^}]*)\}\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = Object.fromEntries([...m[1].matchAll(/(\w+)="([^"]*)"/g)].map((x) => [x[1], x[2]]));
    found.push({ labels, value: Number(m[2]) });
  }
  return found;
}

/** Enabled flows using each piece (`piecework_flows_enabled{piece}`): its adoption. */
function adoptionOf(metrics) {
  return Object.fromEntries(samples(metrics, 'piecework_flows_enabled').map(({ labels, value }) => [labels.piece, value]));
}

async function runsPage() {
  const params = new URLSearchParams(location.hash.split('?')[1] ?? '');
  const filters = { flow: params.get('flow') ?? '', status: params.get('status') ?? '', since: params.get('since') ?? '' };
  const query = new URLSearchParams({ limit: '50' });
  for (const [name, value] of Object.entries(filters)) if (value) query.set(name, value);
  if (params.get('after')) query.set('after', params.get('after'));
  const flows = await api('/v1/flows');
  const go = (change) => {
    const next = new URLSearchParams({ ...filters, ...change });
    for (const [name, value] of [...next]) if (!value) next.delete(name);
    location.hash = `#/runs?${next}`;
  };
  // The list refreshes in place; the filters above it are left alone while one is in use.
  const list = h('div', {});
  const page = location.hash;
  const fill = async () => {
    const runs = await api(`/v1/runs?${query}`);
    if (location.hash !== page) return;
    const rows = runs.runs.map((run) =>
      h('tr', { dataset: { run: run.id, status: run.status } },
        h('td', {}, h('a', { href: `#/runs/${run.id}` }, run.id.slice(0, 8))),
        h('td', {}, h('a', { href: `#/flows/${encodeURIComponent(run.flow_id)}` }, run.flow_id), h('span', { class: 'muted' }, ` v${run.flow_version}`)),
        h('td', {}, badge(run.status)),
        h('td', {}, run.started_by ?? ''),
        h('td', {}, when(run.created_at)),
        h('td', {}, duration(run.created_at, run.finished_at)),
        h('td', { class: 'muted' }, run.error ?? '')));
    list.replaceChildren(
      table(['run', 'flow', 'status', 'started by', 'created', 'took', 'error'], rows, 'No runs match.'),
      runs.next ? h('p', {}, h('a', { href: `#/runs?${new URLSearchParams({ ...filters, after: runs.next })}` }, 'Older runs →')) : '',
    );
    refresh = setTimeout(() => fill().catch(() => {}), 3000);
  };
  await fill();
  show(
    h('h1', {}, 'Runs'),
    h('div', { class: 'filters' },
      h('select', { 'aria-label': 'flow', onchange: (e) => go({ flow: e.target.value }) },
        h('option', { value: '' }, 'every flow'),
        flows.flows.map((f) => h('option', { value: f.id, selected: f.id === filters.flow }, f.id))),
      h('select', { 'aria-label': 'status', onchange: (e) => go({ status: e.target.value }) },
        ['', 'running', 'waiting', 'succeeded', 'failed', 'cancelled'].map((s) => h('option', { value: s, selected: s === filters.status }, s || 'every status'))),
      h('select', { 'aria-label': 'since', onchange: (e) => go({ since: e.target.value }) },
        ['', '15m', '1h', '24h', '7d'].map((s) => h('option', { value: s, selected: s === filters.since }, s ? `last ${s}` : 'any time'))),
      h('span', { class: 'muted' }, 'live: refreshes every 3 s')),
    list,
  );
}

async function runPage(id) {
  const { run } = await api(`/v1/runs/${encodeURIComponent(id)}`);
  const actions = [];
  if (run.status === 'failed' && may('operate_runs')) {
    actions.push(act('Retry from the failed step', () => api(`/v1/runs/${run.id}/retry`, { method: 'POST' })));
  }
  if ((run.status === 'running' || run.status === 'waiting') && may('operate_runs')) {
    actions.push(act('Cancel', () => api(`/v1/runs/${run.id}/cancel`, { method: 'POST' }), { kind: 'danger', confirmText: 'Cancel this run?' }));
  }
  const steps = (run.steps ?? []).map((step) =>
    h('li', { class: step.status, dataset: { step: step.name, status: step.status } },
      h('div', { class: 'row' },
        h('strong', {}, step.name),
        badge(step.status),
        h('span', { class: 'muted' }, [step.piece, step.action].filter(Boolean).join(' · ')),
        h('span', { class: 'muted grow' }, `${step.attempts?.length ?? 0} attempt(s)`),
        h('span', { class: 'muted' }, ms((step.attempts ?? []).reduce((n, a) => n + a.duration_ms, 0)))),
      step.error ? errorBox(step.error) : null,
      h('details', {}, h('summary', {}, 'input'), json(step.input ?? null)),
      step.output !== undefined && step.output !== null ? h('details', { open: true }, h('summary', {}, 'output'), json(step.output)) : null,
      step.attempts?.length
        ? h('details', {}, h('summary', {}, 'attempts'),
          table(['#', 'status', 'started', 'took', 'worker', 'error'], step.attempts.map((a) =>
            h('tr', {}, h('td', {}, a.attempt), h('td', {}, badge(a.status)), h('td', {}, when(a.started_at)), h('td', {}, ms(a.duration_ms)), h('td', {}, a.worker ?? ''), h('td', {}, a.error ?? '')))))
        : null));
  show(
    h('div', { class: 'row' }, h('h1', { class: 'grow' }, 'Run ', h('code', {}, run.id)), ...actions),
    h('div', { class: 'card' },
      h('div', { class: 'row' },
        badge(run.status),
        h('span', {}, 'flow ', h('a', { href: `#/flows/${encodeURIComponent(run.flow_id)}` }, run.flow_id), ` v${run.flow_version}`),
        h('span', { class: 'muted' }, `started by ${run.started_by?.name ?? run.started_by ?? '—'}`),
        h('span', { class: 'muted' }, `created ${when(run.created_at)}`),
        h('span', { class: 'muted' }, `took ${duration(run.created_at, run.finished_at)}`)),
      run.error ? errorBox(run.error) : null,
      h('details', {}, h('summary', {}, 'trigger output'), json(run.trigger ?? null))),
    h('h2', {}, 'Steps'),
    steps.length ? h('ol', { class: 'timeline' }, steps) : h('p', { class: 'muted' }, 'No step has run yet.'),
  );
  if (run.status === 'running' || run.status === 'waiting') watchRun(id, JSON.stringify(run));
}

/** Looks at a run in progress every 2 s and shows it again only when it changed, so what the
 * reader opened stays open meanwhile. */
function watchRun(id, seen) {
  const page = location.hash;
  refresh = setTimeout(async () => {
    if (location.hash !== page) return;
    try {
      const { run } = await api(`/v1/runs/${encodeURIComponent(id)}`);
      if (location.hash !== page) return;
      if (JSON.stringify(run) === seen) watchRun(id, seen);
      else route();
    } catch {
      watchRun(id, seen);
    }
  }, 2000);
}

async function flowsPage() {
  const { flows } = await api('/v1/flows');
  const rows = flows.map((flow) =>
    h('tr', { dataset: { flow: flow.id } },
      h('td', {}, h('a', { href: `#/flows/${encodeURIComponent(flow.id)}` }, flow.id)),
      h('td', {}, badge(flow.enabled ? 'enabled' : 'disabled')),
      h('td', {}, `v${flow.latest_version}`),
      h('td', {}, flow.owner ?? ''),
      h('td', {}, when(flow.updated_at)),
      h('td', {}, may('toggle_flows') ? toggle(flow) : null)));
  show(h('h1', {}, 'Flows'), table(['flow', 'state', 'version', 'owner', 'updated', ''], rows, 'No flows: apply one with `piecework flow apply`.'));
}

function toggle(flow) {
  const action = flow.enabled ? 'disable' : 'enable';
  return act(flow.enabled ? 'Disable' : 'Enable', () => api(`/v1/flows/${encodeURIComponent(flow.id)}/${action}`, { method: 'POST' }), { kind: 'secondary' });
}

async function flowPage(id, version) {
  const detail = await api(`/v1/flows/${encodeURIComponent(id)}`);
  const flow = detail.flow;
  const shown = version ? (await api(`/v1/flows/${encodeURIComponent(id)}/versions/${version}`)).version : detail.latest;
  const { runs } = await api(`/v1/runs?flow=${encodeURIComponent(id)}&limit=10`);
  const versions = [];
  for (let v = flow.latest_version; v >= 1 && versions.length < 20; v--) {
    versions.push(h('a', { href: `#/flows/${encodeURIComponent(id)}/versions/${v}`, class: shown?.version === v ? 'active' : '' }, `v${v}`), ' ');
  }
  show(
    h('div', { class: 'row' }, h('h1', { class: 'grow' }, 'Flow ', h('code', {}, flow.id)), may('toggle_flows') ? toggle(flow) : null),
    h('div', { class: 'card' },
      h('div', { class: 'row' }, badge(flow.enabled ? 'enabled' : 'disabled'), h('span', {}, `latest v${flow.latest_version}`), h('span', { class: 'muted' }, `owner ${flow.owner ?? '—'}`), h('span', { class: 'muted' }, `updated ${when(flow.updated_at)}`)),
      flow.description ? h('p', {}, flow.description) : null,
      h('div', {}, 'Versions: ', versions)),
    h('h2', {}, `Definition (v${shown?.version ?? '?'})`),
    shown ? json(shown.definition) : h('p', { class: 'muted' }, 'No version.'),
    shown?.resolved ? h('details', {}, h('summary', {}, 'piece versions this version pins'), json(shown.resolved)) : null,
    h('h2', {}, 'Last runs'),
    table(['run', 'status', 'created', 'took'], runs.map((run) =>
      h('tr', {}, h('td', {}, h('a', { href: `#/runs/${run.id}` }, run.id.slice(0, 8))), h('td', {}, badge(run.status)), h('td', {}, when(run.created_at)), h('td', {}, duration(run.created_at, run.finished_at)))), 'No runs yet.'),
    h('p', {}, h('a', { href: `#/runs?flow=${encodeURIComponent(id)}` }, 'Every run of this flow →')),
  );
}

async function piecesPage() {
  const [{ pieces }, stats] = await Promise.all([api('/v1/pieces'), api('/v1/stats?since=1m')]);
  const health = stats.health;
  const rows = pieces.map((piece) => {
    const checks = health.filter((x) => x.piece === piece.name);
    return h('tr', { dataset: { piece: piece.name } },
      h('td', {}, h('a', { href: `#/pieces/${encodeURIComponent(piece.name)}` }, piece.name)),
      h('td', {}, piece.display_name),
      h('td', {}, piece.version),
      h('td', {}, piece.actions.length),
      h('td', {}, piece.triggers.length),
      h('td', {}, checks.length ? badge(checks.every((x) => x.healthy) ? 'healthy' : 'unhealthy') : h('span', { class: 'muted' }, '—')));
  });
  show(h('h1', {}, 'Pieces'), table(['piece', 'name', 'version', 'actions', 'triggers', 'health'], rows));
}

async function piecePage(name) {
  const [detail, versions, docs] = await Promise.all([
    api(`/v1/pieces/${encodeURIComponent(name)}`),
    api(`/v1/pieces/${encodeURIComponent(name)}/versions`),
    api(`/v1/pieces/${encodeURIComponent(name)}/docs`),
  ]);
  show(
    h('h1', {}, detail.piece.display_name, h('span', { class: 'muted' }, ` ${detail.piece.name} ${detail.piece.version}`)),
    h('h2', {}, 'Versions'),
    table(['version', 'source', 'digest', 'published'], versions.versions.map((v) =>
      h('tr', {}, h('td', {}, v.version), h('td', {}, v.source ?? ''), h('td', {}, h('code', {}, (v.digest ?? '').slice(0, 19))), h('td', {}, v.published ? `${when(v.published.published_at)} by ${v.published.publisher}` : '—')))),
    h('h2', {}, 'Documentation'),
    h('div', { class: 'card docs' }, markdown(docs)),
  );
}

/** The Markdown `piece docs` writes, as elements: headings, paragraphs, lists, tables, code. */
function markdown(text) {
  const out = [];
  const lines = String(text).split('\n');
  const inline = (s) => {
    const parts = [];
    for (const piece of s.split(/(`[^`]+`|\*\*[^*]+\*\*)/)) {
      if (piece.startsWith('`') && piece.endsWith('`') && piece.length > 1) parts.push(h('code', {}, piece.slice(1, -1)));
      else if (piece.startsWith('**') && piece.endsWith('**')) parts.push(h('strong', {}, piece.slice(2, -2)));
      else if (piece) parts.push(piece);
    }
    return parts;
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (/^```/.test(line)) {
      const code = [];
      while (++i < lines.length && !/^```/.test(lines[i])) code.push(lines[i]);
      out.push(h('pre', {}, code.join('\n')));
    } else if (/^#{1,4} /.test(line)) {
      const level = line.indexOf(' ');
      out.push(h(`h${Math.min(level, 4)}`, {}, inline(line.slice(level + 1))));
    } else if (/^\s*[-*] /.test(line)) {
      const items = [];
      for (; i < lines.length && /^\s*[-*] /.test(lines[i]); i++) items.push(h('li', {}, inline(lines[i].replace(/^\s*[-*] /, ''))));
      i--;
      out.push(h('ul', {}, items));
    } else if (/^\|/.test(line)) {
      const rows = [];
      for (; i < lines.length && /^\|/.test(lines[i]); i++) rows.push(lines[i]);
      i--;
      const cells = (row) => row.replace(/^\||\|$/g, '').split('|').map((c) => c.trim());
      const body = rows.filter((_, n) => n !== 1 || !/^[\s|:-]+$/.test(rows[1]));
      out.push(h('table', {}, body.map((row, n) => h('tr', {}, cells(row).map((c) => h(n === 0 ? 'th' : 'td', {}, inline(c)))))));
    } else if (line.trim()) {
      out.push(h('p', {}, inline(line)));
    }
  }
  return out;
}

async function connectionsPage() {
  const [{ connections }, { pieces }] = await Promise.all([api('/v1/connections'), api('/v1/pieces')]);
  const rows = connections.map((c) =>
    h('tr', { dataset: { connection: c.name } },
      h('td', {}, c.name),
      h('td', {}, h('a', { href: `#/pieces/${encodeURIComponent(c.piece)}` }, c.piece)),
      h('td', {}, when(c.created_at)),
      h('td', {}, when(c.updated_at)),
      h('td', {}, c.last_used_at ? when(c.last_used_at) : h('span', { class: 'muted' }, 'never')),
      h('td', {}, c.key_id),
      h('td', {}, may('manage_connections') ? act('Delete', () => api(`/v1/connections/${encodeURIComponent(c.name)}`, { method: 'DELETE' }), { kind: 'secondary', confirmText: `Delete connection ${c.name}?` }) : null)));
  show(
    h('h1', {}, 'Connections'),
    h('p', { class: 'muted' }, 'Values are encrypted at rest and never shown.'),
    table(['name', 'piece', 'created', 'updated', 'last used', 'key', ''], rows, 'No connections.'),
    may('manage_connections') ? connectionForm(pieces.filter((p) => p.auth?.type && p.auth.type !== 'none')) : null,
  );
}

/** A form for a new connection, made from the chosen piece's auth. */
function connectionForm(pieces) {
  const fields = h('div', {});
  const name = h('input', { name: 'name', required: true, pattern: '[a-z0-9_\\-]{1,100}', title: 'lowercase letters, digits, - or _', placeholder: 'prod-crm' });
  const piece = h('select', { name: 'piece' }, pieces.map((p) => h('option', { value: p.name }, `${p.display_name} (${p.name})`)));
  const inputs = new Map();
  const render = () => {
    inputs.clear();
    const chosen = pieces.find((p) => p.name === piece.value);
    const auth = chosen?.auth ?? {};
    const props =
      auth.type === 'custom' ? auth.props
        : auth.type === 'basic' ? [{ name: 'username', display_name: 'Username', type: 'short_text', required: true }, { name: 'password', display_name: 'Password', type: 'secret_text', required: true }]
          : auth.type === 'secret_text' ? [{ name: '', display_name: auth.display_name ?? 'Secret', type: 'secret_text', required: true }]
            : auth.type === 'oauth2' ? [{ name: 'access_token', display_name: 'Access token', type: 'secret_text', required: true }]
              : [];
    fields.replaceChildren(...props.map((prop) => {
      const input = prop.type === 'static_dropdown'
        ? h('select', { name: prop.name }, (prop.options ?? []).map((o) => h('option', { value: JSON.stringify(o.value) }, o.label)))
        : prop.type === 'checkbox' ? h('input', { type: 'checkbox', name: prop.name })
          : h('input', { type: prop.type === 'secret_text' ? 'password' : prop.type === 'number' ? 'number' : 'text', name: prop.name, required: prop.required, autocomplete: 'off' });
      inputs.set(prop.name, { prop, input });
      return h('div', {}, h('label', {}, prop.display_name, prop.required ? ' *' : ''), input, prop.description ? h('div', { class: 'muted' }, prop.description) : null);
    }));
  };
  piece.addEventListener('change', render);
  render();
  const status = h('div', {});
  const form = h('form', { class: 'card stack' },
    h('h2', {}, 'New connection'),
    h('label', {}, 'Name'), name,
    h('label', {}, 'Piece'), piece,
    fields,
    h('p', {}, h('button', { type: 'submit' }, 'Save (the piece checks it)')),
    status);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    let values = {};
    for (const [key, { prop, input }] of inputs) {
      let value = prop.type === 'checkbox' ? input.checked : prop.type === 'static_dropdown' ? JSON.parse(input.value) : input.value;
      if (prop.type === 'number' && value !== '') value = Number(value);
      if (value === '' && !prop.required) continue;
      if (key === '') values = value;
      else values[key] = value;
    }
    try {
      await api('/v1/connections', { method: 'POST', json: { name: name.value, piece: piece.value, values } });
      route();
    } catch (err) {
      status.replaceChildren(errorBox(err.message));
    }
  });
  return form;
}

async function auditPage() {
  const params = new URLSearchParams(location.hash.split('?')[1] ?? '');
  const names = ['actor', 'action', 'resource', 'outcome', 'since'];
  const query = new URLSearchParams({ limit: '100' });
  for (const name of [...names, 'after']) if (params.get(name)) query.set(name, params.get(name));
  if (!params.get('since')) query.set('since', '24h');
  const page = await api(`/v1/audit?${query}`);
  const form = h('form', { class: 'filters' },
    names.map((name) => name === 'outcome'
      ? h('select', { name, 'aria-label': name }, ['', 'success', 'failure'].map((o) => h('option', { value: o, selected: params.get(name) === o }, o || 'any outcome')))
      : h('input', { name, placeholder: name === 'since' ? 'since (24h, 2026-12-01T00:00:00Z)' : name, value: params.get(name) ?? '' })),
    h('button', { type: 'submit' }, 'Filter'));
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const next = new URLSearchParams();
    for (const [name, value] of new FormData(form)) if (value) next.set(name, value);
    location.hash = `#/audit?${next}`;
  });
  const rows = page.entries.map((e) =>
    h('tr', {}, h('td', {}, when(e.time)), h('td', {}, e.actor), h('td', {}, e.action), h('td', {}, e.resource), h('td', {}, badge(e.outcome)), h('td', {}, ms(e.duration_ms)), h('td', { class: 'muted' }, e.error ?? '')));
  const more = new URLSearchParams(params);
  if (page.next) more.set('after', page.next);
  show(
    h('h1', {}, 'Audit trail'),
    form,
    table(['time', 'actor', 'action', 'resource', 'outcome', 'took', 'error'], rows, 'No entries match.'),
    page.next ? h('p', {}, h('a', { href: `#/audit?${more}` }, 'More →')) : null,
  );
}

// ---- login and routing ----------------------------------------------------------------------

function showLogin(message) {
  clearTimeout(refresh);
  whoami = null;
  document.getElementById('who').replaceChildren();
  const key = h('input', { type: 'password', name: 'key', placeholder: 'pwk_…', autocomplete: 'off', required: true });
  const status = h('div', {}, message ? errorBox(message) : null);
  const form = h('form', { class: 'card login' },
    h('h1', {}, 'Log in'),
    h('p', { class: 'muted' }, 'With an API key (`piecework api-key create NAME --role viewer`). It is kept for this tab only.'),
    key,
    h('button', { type: 'submit' }, 'Log in'),
    status);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, key.value.trim());
    try {
      await identify();
      route();
    } catch (err) {
      // A refused key has already brought the form back, saying so.
      if (err.status !== 401) status.replaceChildren(errorBox(err.message));
    }
  });
  show(form);
}

async function identify() {
  whoami = await api('/v1/whoami');
  const logout = h('button', { class: 'secondary', type: 'button' }, 'Log out');
  logout.addEventListener('click', () => {
    sessionStorage.removeItem(KEY);
    showLogin();
  });
  document.getElementById('who').replaceChildren(`${whoami.name} · ${whoami.role}`, whoami.name === 'anonymous' ? '' : logout);
}

const routes = [
  [/^#?\/?(\?.*)?$/, overviewPage, 'Overview'],
  [/^#\/runs\/([^/?]+)$/, runPage, 'Runs'],
  [/^#\/runs(\?.*)?$/, runsPage, 'Runs'],
  [/^#\/flows\/([^/?]+)\/versions\/(\d+)$/, flowPage, 'Flows'],
  [/^#\/flows\/([^/?]+)$/, flowPage, 'Flows'],
  [/^#\/flows$/, flowsPage, 'Flows'],
  [/^#\/pieces\/([^/?]+)$/, piecePage, 'Pieces'],
  [/^#\/pieces$/, piecesPage, 'Pieces'],
  [/^#\/connections$/, connectionsPage, 'Connections'],
  [/^#\/audit(\?.*)?$/, auditPage, 'Audit'],
];

async function route() {
  clearTimeout(refresh);
  if (!whoami) return;
  const hash = location.hash || '#/';
  for (const [pattern, page, section] of routes) {
    const match = pattern.exec(hash);
    if (!match) continue;
    for (const link of document.querySelectorAll('#nav a')) link.classList.toggle('active', link.textContent === section);
    const args = match.slice(1).filter((x) => x !== undefined && !x.startsWith('?')).map(decodeURIComponent);
    try {
      await page(...args);
    } catch (err) {
      if (err.status !== 401) show(h('h1', {}, section), errorBox(err.message));
    }
    return;
  }
  show(h('h1', {}, 'Not found'), h('p', {}, h('a', { href: '#/' }, 'Overview')));
}

window.addEventListener('hashchange', route);
(async () => {
  try {
    await identify();
    route();
  } catch (err) {
    // 401: the login form is up.
    if (err.status !== 401) show(errorBox(err.message));
  }
})();
