'use strict';
// Names in piecework are snake_case (props, actions, triggers) and kebab-case (pieces); the
// Activepieces framework's are whatever their authors chose, often camelCase. The host shows
// piecework the snake_case form and maps each back to the piece's own name on every call.

/** `apiKey` → `api_key`, `create-ticket` → `create_ticket`, `HTTPStatus` → `http_status`. */
function snake(name) {
  return String(name)
    .replace(/([a-z0-9])([A-Z])/g, '$1_$2')
    .replace(/([A-Z]+)([A-Z][a-z])/g, '$1_$2')
    .replace(/[^A-Za-z0-9]+/g, '_')
    .replace(/^_+|_+$/g, '')
    .toLowerCase()
    .replace(/^([0-9])/, 'n_$1');
}

/** `@acme/piece-my-company-api` → `my-company-api`. */
function pieceName(packageName) {
  const bare = String(packageName).replace(/^@[^/]+\//, '').replace(/^piece-/, '');
  return snake(bare).replace(/_/g, '-');
}

/**
 * A two-way map between a member's own names and piecework's; refuses two names that would
 * read the same in piecework (`apiKey` and `api_key`).
 */
function nameMap(names, what) {
  const toOwn = new Map();
  for (const own of names) {
    const ours = snake(own);
    if (toOwn.has(ours) && toOwn.get(ours) !== own) {
      throw new Error(`${what}: \`${toOwn.get(ours)}\` and \`${own}\` both read \`${ours}\` in piecework; rename one`);
    }
    toOwn.set(ours, own);
  }
  return toOwn;
}

/** `{api_key: v}` → `{apiKey: v}` for the names `toOwn` knows; others pass as they are. */
function toOwnKeys(values, toOwn) {
  const out = {};
  for (const [key, value] of Object.entries(values ?? {})) {
    out[toOwn.get(key) ?? key] = value;
  }
  return out;
}

module.exports = { snake, pieceName, nameMap, toOwnKeys };
