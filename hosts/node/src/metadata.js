'use strict';
// What piecework knows of a piece written with the Activepieces framework: its metadata in
// piecework's schema (`piece.json`, what `describe` answers), and the tables that map
// piecework's names back to the piece's own.

const { snake, pieceName, nameMap } = require('./names');

/** A feature of the framework piecework cannot give a piece: a clear error naming it. */
class Unsupported extends Error {
  constructor(feature) {
    super(`${feature} is not supported by piecework's Node host`);
    this.name = 'Unsupported';
  }
}

/** piecework's prop kind for one of the framework's properties, or null for a display-only one. */
function propKind(property, where) {
  const options = () =>
    (property.options?.options ?? []).map((o) => ({ label: String(o.label), value: o.value }));
  switch (property.type) {
    case 'SHORT_TEXT':
    case 'COLOR':
      return { type: 'short_text' };
    case 'LONG_TEXT':
      return { type: 'long_text' };
    case 'NUMBER':
      return { type: 'number' };
    case 'CHECKBOX':
      return { type: 'checkbox' };
    case 'SECRET_TEXT':
      return { type: 'secret_text' };
    case 'DATE_TIME':
      return { type: 'date_time' };
    case 'OBJECT':
      return { type: 'object' };
    case 'JSON':
    case 'DYNAMIC':
    case 'CUSTOM':
      return { type: 'json' };
    case 'ARRAY':
      return property.properties ? { type: 'array', items: { type: 'object' } } : { type: 'array' };
    case 'STATIC_DROPDOWN':
      return { type: 'static_dropdown', options: options() };
    case 'STATIC_MULTI_SELECT_DROPDOWN':
      return { type: 'array', items: { type: 'static_dropdown', options: options() } };
    case 'DROPDOWN':
      return { type: 'dynamic_dropdown', refreshers: (property.refreshers ?? []).map(snake) };
    case 'MULTI_SELECT_DROPDOWN':
      return {
        type: 'array',
        items: { type: 'dynamic_dropdown', refreshers: (property.refreshers ?? []).map(snake) },
      };
    case 'MARKDOWN':
      return null;
    default:
      throw new Unsupported(`${where}: a \`${property.type}\` property`);
  }
}

/** piecework props for a framework props map, and the map back to the piece's names. */
function props(map, where) {
  const entries = Object.entries(map ?? {});
  const names = nameMap(
    entries.map(([name]) => name),
    where,
  );
  const out = [];
  for (const [name, property] of entries) {
    const kind = propKind(property, `${where}.${name}`);
    if (kind === null) continue;
    const prop = {
      name: snake(name),
      display_name: String(property.displayName ?? name),
      required: Boolean(property.required),
      ...kind,
    };
    if (property.description) prop.description = String(property.description);
    if (property.defaultValue !== undefined) prop.default = property.defaultValue;
    out.push(prop);
  }
  return { props: out, names };
}

function auth(pieceAuth) {
  if (pieceAuth === undefined || pieceAuth === null) return { spec: { type: 'none' }, names: new Map() };
  if (Array.isArray(pieceAuth)) {
    if (pieceAuth.length !== 1) throw new Unsupported('a piece with several auth methods');
    return auth(pieceAuth[0]);
  }
  const base = { display_name: String(pieceAuth.displayName ?? 'Connection') };
  if (pieceAuth.description) base.description = String(pieceAuth.description);
  switch (pieceAuth.type) {
    case 'SECRET_TEXT':
      return { spec: { type: 'secret_text', ...base }, names: new Map() };
    case 'BASIC_AUTH':
      return { spec: { type: 'basic', ...base }, names: new Map() };
    case 'CUSTOM_AUTH': {
      const converted = props(pieceAuth.props, 'auth');
      return { spec: { type: 'custom', ...base, props: converted.props }, names: converted.names };
    }
    case 'OAUTH2':
      return {
        spec: {
          type: 'o_auth2',
          display_name: base.display_name,
          auth_url: String(pieceAuth.authUrl ?? ''),
          token_url: String(pieceAuth.tokenUrl ?? ''),
          scopes: (pieceAuth.scope ?? []).map(String),
        },
        names: new Map(),
      };
    default:
      throw new Unsupported(`\`${pieceAuth.type}\` auth`);
  }
}

function triggerKind(trigger) {
  switch (trigger.type) {
    case 'POLLING':
      // The framework's polling helper keeps its own place in the store; what it returns is
      // new, and piecework's last-item dedupe only guards against a repeated poll.
      return { type: 'polling', strategy: 'last_item', default_interval: '5m' };
    case 'WEBHOOK': {
      // A source that must be answered a handshake, or whose registration must be renewed,
      // would stop calling without a word: refuse such a trigger rather than run it half.
      const handshake = trigger.handshakeConfiguration?.strategy ?? 'NONE';
      if (handshake !== 'NONE') throw new Unsupported(`trigger \`${trigger.name}\`: a webhook handshake (\`${handshake}\`)`);
      const renew = trigger.renewConfiguration?.strategy ?? 'NONE';
      if (renew !== 'NONE') throw new Unsupported(`trigger \`${trigger.name}\`: renewing its webhook (\`${renew}\`)`);
      return { type: 'webhook' };
    }
    default:
      throw new Unsupported(`trigger \`${trigger.name}\`: a \`${trigger.type}\` trigger`);
  }
}

/**
 * Reads `piece` (a framework `Piece`) published as package `pkg` ({name, version,
 * description}): piecework's metadata, and the lookup tables of the host.
 */
function describe(piece, pkg) {
  const hasAuth = piece.auth !== undefined && piece.auth !== null;
  const pieceAuth = auth(piece.auth);
  const actions = new Map();
  const triggers = new Map();
  const metadata = {
    name: pieceName(pkg.name),
    display_name: String(piece.displayName),
    description: String(piece.description || pkg.description || ''),
    version: String(pkg.version),
    auth: pieceAuth.spec,
    categories: (piece.categories ?? []).map((c) => String(c).toLowerCase()),
    authors: (piece.authors ?? []).map(String),
    minimum_supported_release: '0.1.0',
    actions: [],
    triggers: [],
  };
  if (piece.logoUrl) metadata.logo_url = String(piece.logoUrl);
  // A member using a feature the host lacks is left out (and said so), not the whole piece.
  const skipped = [];
  const each = (members, convert) => {
    for (const member of Object.values(members)) {
      try {
        convert(member);
      } catch (err) {
        if (!(err instanceof Unsupported)) throw err;
        skipped.push(err.message);
      }
    }
  };
  each(piece.actions(), (action) => {
    const name = snake(action.name);
    const converted = props(action.props, `action \`${action.name}\``);
    metadata.actions.push({
      name,
      display_name: String(action.displayName ?? action.name),
      description: String(action.description ?? ''),
      props: converted.props,
      require_auth: hasAuth && action.requireAuth !== false,
      // The guide's convention: the action named `health_check` reports the system's health
      // (`{status: 'healthy'|…}`), which piecework exports as `piecework_piece_healthy`.
      ...(name === 'health_check' ? { health_check: true } : {}),
    });
    actions.set(name, { action, names: converted.names });
  });
  each(piece.triggers(), (trigger) => {
    const name = snake(trigger.name);
    const kind = triggerKind(trigger);
    const converted = props(trigger.props, `trigger \`${trigger.name}\``);
    metadata.triggers.push({
      name,
      display_name: String(trigger.displayName ?? trigger.name),
      description: String(trigger.description ?? ''),
      props: converted.props,
      require_auth: hasAuth && trigger.requireAuth !== false,
      ...kind,
    });
    triggers.set(name, { trigger, names: converted.names });
  });
  return { metadata, actions, triggers, skipped, authNames: pieceAuth.names, pieceAuth: piece.auth };
}

/** The piece among a module's exports: the one built by `createPiece`. */
function findPiece(exports) {
  const candidates = Object.values(exports ?? {}).filter(
    (value) =>
      value && typeof value === 'object' && typeof value.actions === 'function' && typeof value.triggers === 'function' && 'displayName' in value,
  );
  if (candidates.length !== 1) {
    throw new Error(
      `the module exports ${candidates.length} pieces made with createPiece; it must export exactly one`,
    );
  }
  return candidates[0];
}

module.exports = { describe, findPiece, Unsupported };
