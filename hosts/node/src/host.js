'use strict';
// piecework's Node host: serves a piece written with the Activepieces framework over piece
// protocol 1.3 (docs/piece-protocol.md) on stdin and stdout. Everything the piece prints
// goes to stderr, which the piecework host logs; stdout carries protocol frames only.

const { describe: describePiece, Unsupported } = require('./metadata');
const { toOwnKeys } = require('./names');
const { callLimits, install } = require('./egress');

const PROTOCOL = '1.3';
/** The flow-store key where the host keeps the id of the newest item its last poll returned. */
const LAST_POLLED = 'piecework:last_polled';
const DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024;

class PieceError extends Error {
  constructor(kind, message, retryAfterMs) {
    super(message);
    this.kind = kind;
    this.retryAfterMs = retryAfterMs;
  }
}

const fatal = (message) => new PieceError('fatal', message);

/** How an error the piece threw travels: 5xx, 429 and network errors may pass, the rest not. */
function wireError(err) {
  if (err instanceof PieceError) {
    const out = { kind: err.kind, message: err.message };
    if (err.retryAfterMs) out.retry_after_ms = err.retryAfterMs;
    return out;
  }
  if (err instanceof Unsupported) return { kind: 'fatal', message: err.message };
  const status = err?.response?.status ?? err?.status;
  const retryable =
    (typeof status === 'number' && (status >= 500 || status === 429 || status === 408)) ||
    ['ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'EAI_AGAIN', 'EPIPE'].includes(err?.code);
  // `fetch failed` says little: its cause (ECONNREFUSED 127.0.0.1:3000) says what.
  let message = String(err?.message ?? err ?? 'the piece failed');
  for (let cause = err?.cause; cause; cause = cause.cause) message += `: ${cause.message ?? cause}`;
  message = message.slice(0, 4000);
  return { kind: retryable ? 'retryable' : 'fatal', message };
}

/** A getter or function the framework's context has and piecework's host does not. */
function unsupported(feature) {
  return () => {
    throw new Unsupported(feature);
  };
}

/** The connection's values as the framework hands them to a piece, in both its shapes. */
function authValue(kind, values, names) {
  if (values === undefined || values === null) return undefined;
  switch (kind?.type) {
    case 'SECRET_TEXT': {
      const secret = typeof values === 'string' ? values : String(values.secret_text ?? '');
      // `context.auth.secret_text` (the framework today) and `${context.auth}` (before).
      return { type: 'SECRET_TEXT', secret_text: secret, toString: () => secret };
    }
    case 'BASIC_AUTH':
      return { type: 'BASIC_AUTH', username: values.username, password: values.password };
    case 'CUSTOM_AUTH': {
      const own = toOwnKeys(values, names);
      // `context.auth.props.apiKey` (today) and `context.auth.apiKey` (the guide's pieces).
      return { ...own, type: 'CUSTOM_AUTH', props: own };
    }
    case 'OAUTH2':
      return { type: 'OAUTH2', ...values, data: values.data ?? {} };
    default:
      return values;
  }
}

class Host {
  constructor(piece, pkg, output) {
    this.piece = piece;
    this.pkg = pkg;
    this.output = output;
    this.described = null;
    this.nextId = 1;
    this.waiting = new Map(); // our requests to piecework, by id
    this.calls = new Map(); // piecework's requests in flight: id → AbortController
    this.maxMessageBytes = DEFAULT_MAX_MESSAGE_BYTES;
  }

  send(frame) {
    let line = JSON.stringify(frame);
    if (Buffer.byteLength(line) + 1 > this.maxMessageBytes && frame.id !== undefined && 'result' in frame) {
      line = JSON.stringify({
        id: frame.id,
        error: { kind: 'fatal', message: `the answer is larger than the ${this.maxMessageBytes} bytes a frame may hold` },
      });
    }
    this.output.write(line + '\n');
  }

  /** A request to piecework (the store), answered by a response frame. */
  request(method, params) {
    const id = this.nextId++;
    this.send({ id, method, params });
    return new Promise((resolve, reject) => this.waiting.set(id, { resolve, reject }));
  }

  log(call, level, message) {
    this.send({ method: 'log', params: { call, level, message: String(message) } });
  }

  async handle(line) {
    let frame;
    try {
      frame = JSON.parse(line);
    } catch (err) {
      this.log(undefined, 'warn', `not a protocol frame: ${err.message}`);
      return;
    }
    if (frame.method === undefined && frame.id !== undefined) {
      const waiter = this.waiting.get(frame.id);
      this.waiting.delete(frame.id);
      if (!waiter) return;
      if (frame.error) waiter.reject(new PieceError(frame.error.kind, frame.error.message));
      else waiter.resolve(frame.result ?? null);
      return;
    }
    if (frame.id === undefined) {
      if (frame.method === 'cancel') this.calls.get(frame.params?.id)?.abort();
      return;
    }
    const abort = new AbortController();
    this.calls.set(frame.id, abort);
    try {
      const cancelled = new Promise((_, reject) =>
        abort.signal.addEventListener('abort', () => reject(fatal('cancelled: the call was stopped'))),
      );
      const params = frame.params ?? {};
      const limits = {
        maxResponseBytes: Number(params.context?.limits?.max_response_bytes) || 0,
        signal: abort.signal,
      };
      const work = callLimits.run(limits, () => this.dispatch(frame.id, frame.method, params));
      const result = await Promise.race([work, cancelled]);
      this.send({ id: frame.id, result: result === undefined ? null : result });
    } catch (err) {
      this.send({ id: frame.id, error: wireError(err) });
    } finally {
      this.calls.delete(frame.id);
    }
  }

  async dispatch(call, method, params) {
    if (method === 'describe') return this.describe(params);
    if (!this.described) throw fatal('`describe` comes first');
    switch (method) {
      case 'run_action':
        return this.runAction(call, params);
      case 'validate_auth':
        return this.validateAuth(params);
      case 'poll':
        return this.poll(call, params);
      case 'webhook':
        return this.webhook(call, params);
      case 'enable':
        return this.hook(call, params, 'onEnable');
      case 'disable':
        return this.hook(call, params, 'onDisable');
      case 'options':
        return this.options(call, params);
      case 'health':
        return { status: 'ok', in_flight: this.calls.size - 1 };
      case 'schedule':
        throw fatal('pieces of the Activepieces framework have no schedule triggers');
      default:
        throw fatal(`unknown method \`${method}\``);
    }
  }

  describe(params) {
    const theirs = String(params.protocol ?? '');
    if (theirs.split('.')[0] !== PROTOCOL.split('.')[0]) {
      throw fatal(`the host speaks piece protocol ${theirs}, this piece speaks ${PROTOCOL}: major versions differ`);
    }
    if (params.max_message_bytes) this.maxMessageBytes = params.max_message_bytes;
    // The framework's URLs end with a slash.
    this.publicUrl = `${String(params.public_url ?? 'http://127.0.0.1:8080').replace(/\/+$/, '')}/`;
    if (!this.guarded) {
      // Every connection the piece makes is held to the installation's egress policy.
      install(params.egress ?? {});
      this.guarded = true;
    }
    this.described = describePiece(this.piece, this.pkg);
    for (const why of this.described.skipped) this.log(undefined, 'warn', `left out: ${why}`);
    return { protocol: PROTOCOL, piece: this.described.metadata };
  }

  member(kind, name) {
    const table = kind === 'action' ? this.described.actions : this.described.triggers;
    const found = table.get(name);
    if (!found) throw fatal(`the piece has no ${kind} \`${name}\``);
    return found;
  }

  /** The context the framework's members expect, for call `call` of piecework's. */
  context(call, params, names) {
    const run = params.context?.run ?? {};
    const store = (scope) => (s) => (s === 'COLLECTION' || s === 'PROJECT' ? 'global' : scope);
    const scopeOf = store('flow');
    const host = this;
    return {
      auth: authValue(this.described.pieceAuth, params.context?.auth, this.described.authNames),
      propsValue: toOwnKeys(params.input, names),
      store: {
        async get(key, scope) {
          return host.request('store.get', { call, scope: scopeOf(scope), key });
        },
        async put(key, value, scope) {
          await host.request('store.put', { call, scope: scopeOf(scope), key, value });
          return value;
        },
        async delete(key, scope) {
          await host.request('store.delete', { call, scope: scopeOf(scope), key });
        },
      },
      server: {
        apiUrl: this.publicUrl,
        publicUrl: this.publicUrl,
        get token() {
          throw new Unsupported('`context.server.token` (the Activepieces API)');
        },
      },
      run: {
        id: run.run_id,
        name: run.flow_id,
        isTest: false,
        stop: unsupported('`context.run.stop`'),
        pause: unsupported('`context.run.pause` (use a `wait_for` step)'),
        respond: unsupported('`context.run.respond` (use `webhook.return_response`)'),
        createWaitpoint: unsupported('`context.run.createWaitpoint` (use a `wait_for` step)'),
        waitForWaitpoint: unsupported('`context.run.waitForWaitpoint` (use a `wait_for` step)'),
      },
      step: { name: run.step },
      project: { id: params.context?.owner?.id ?? 'piecework', externalId: async () => undefined },
      flows: {
        current: { id: run.flow_id, version: { id: String(run.flow_version ?? '') } },
        list: unsupported('`context.flows.list`'),
      },
      connections: { get: unsupported('`context.connections.get`') },
      files: {
        async write({ fileName, data }) {
          const bytes = Buffer.isBuffer(data) ? data : Buffer.from(data ?? '');
          // No file store yet: the file travels in the output as a data URL.
          return `data:application/octet-stream;name=${encodeURIComponent(fileName)};base64,${bytes.toString('base64')}`;
        },
      },
      tags: { add: unsupported('`context.tags.add`') },
      output: { update: unsupported('`context.output.update`') },
      agent: { tools: unsupported('`context.agent`') },
      executionType: 'BEGIN',
      generateResumeUrl: unsupported('`context.generateResumeUrl` (use `{{ run.resume_url }}` in a flow)'),
    };
  }

  async runAction(call, params) {
    const { action, names } = this.member('action', params.action);
    return action.run(this.context(call, params, names));
  }

  async validateAuth(params) {
    const validate = this.described.pieceAuth?.validate;
    if (typeof validate !== 'function') return null;
    const context = this.context(0, params, new Map());
    const verdict = await validate({ auth: context.auth, server: context.server });
    if (verdict && verdict.valid === false) throw fatal(String(verdict.error ?? 'the connection was refused'));
    return null;
  }

  async poll(call, params) {
    const { trigger, names } = this.member('trigger', params.trigger);
    if (trigger.type !== 'POLLING') throw fatal(`trigger \`${params.trigger}\` is not a polling trigger`);
    const context = {
      ...this.context(call, params, names),
      setSchedule: unsupported('`context.setSchedule` (set the flow\'s `poll_interval`)'),
    };
    // `piece test` asks for the source's recent items: the framework's `test` gives them
    // without touching the trigger's state.
    const trial = params.trial && typeof trigger.test === 'function';
    const items = (await (trial ? trigger.test(context) : trigger.run(context))) ?? [];
    if (params.trial) return items.map((data) => ({ id: contentId(data), data }));
    // Newest first, as the framework's helper returns them; each item's content is its id.
    const polled = items.map((data) => ({ id: contentId(data), data }));
    // The framework's helper returns only what is new since its last poll, but piecework's
    // dedupe reads a page back to an item it has seen (else it reports a gap): end the page
    // with the newest item of the last poll, which piecework knows and does not run again.
    const previous = await context.store.get(LAST_POLLED);
    if (polled.length > 0) {
      await context.store.put(LAST_POLLED, polled[0].id);
      if (previous && !polled.some((item) => item.id === previous)) polled.push({ id: previous, data: null });
    }
    return polled;
  }

  async webhook(call, params) {
    const { trigger, names } = this.member('trigger', params.trigger);
    if (trigger.type !== 'WEBHOOK') throw fatal(`trigger \`${params.trigger}\` is not a webhook trigger`);
    const request = params.request ?? {};
    const context = {
      ...this.context(call, params, names),
      webhookUrl: params.webhook_url ?? '',
      payload: {
        method: request.method,
        headers: request.headers ?? {},
        queryParams: request.query ?? {},
        body: request.body,
      },
    };
    return (await trigger.run(context)) ?? [];
  }

  /** A trigger's `onEnable` or `onDisable`: its flow starts or stops listening. */
  async hook(call, params, name) {
    const { trigger, names } = this.member('trigger', params.trigger);
    const context = {
      ...this.context(call, params, names),
      webhookUrl: params.webhook_url ?? '',
      setSchedule: unsupported("`context.setSchedule` (set the flow's `poll_interval`)"),
    };
    if (typeof trigger[name] === 'function') await trigger[name](context);
    return null;
  }

  async options(call, params) {
    const member = params.action !== undefined ? this.member('action', params.action) : this.member('trigger', params.trigger);
    const own = member.names.get(params.prop) ?? params.prop;
    const property = (member.action ?? member.trigger).props?.[own];
    if (!property || typeof property.options !== 'function') {
      throw fatal(`prop \`${params.prop}\` is not a dynamic dropdown`);
    }
    const context = this.context(call, params, member.names);
    const answer = await property.options({ auth: context.auth, ...context.propsValue }, context);
    return {
      options: (answer?.options ?? []).map((o) => ({ label: String(o.label), value: o.value })),
      ...(answer?.placeholder ? { placeholder: String(answer.placeholder) } : {}),
      ...(answer?.disabled ? { disabled: true } : {}),
    };
  }
}

/** A stable id for an item: its JSON, hashed. */
function contentId(data) {
  return require('node:crypto').createHash('sha256').update(JSON.stringify(data) ?? 'null').digest('hex').slice(0, 32);
}

/**
 * Serves `piece` (made with `createPiece`) of package `pkg` until stdin closes. A line longer
 * than the frame limit is skipped, failing its call when its id can be read from its start.
 */
function serve(piece, pkg) {
  // Whatever the piece prints goes to stderr: stdout belongs to the protocol.
  console.log = console.info = console.debug = (...args) => console.error(...args);
  const host = new Host(piece, pkg, process.stdout);
  // A promise a piece forgot to await must not take down the calls of every other step.
  process.on('unhandledRejection', (reason) => {
    host.log(undefined, 'warn', `a promise of the piece failed unobserved: ${reason?.message ?? reason}`);
  });
  let chunks = [];
  let length = 0;
  let head = null; // the start of a line being skipped
  const endLine = () => {
    if (head !== null) {
      const id = /^\s*\{\s*"id"\s*:\s*(\d+)/.exec(head.toString('utf8'))?.[1];
      if (id !== undefined) {
        host.send({
          id: Number(id),
          error: { kind: 'fatal', message: `the request is larger than the ${host.maxMessageBytes} bytes a frame may hold` },
        });
      }
    } else {
      const line = Buffer.concat(chunks).toString('utf8');
      if (line.trim()) host.handle(line);
    }
    chunks = [];
    length = 0;
    head = null;
  };
  const add = (bytes) => {
    if (head === null && length + bytes.length > host.maxMessageBytes) {
      head = Buffer.concat([...chunks, bytes]).subarray(0, 64);
      chunks = [];
    }
    if (head === null) {
      chunks.push(bytes);
      length += bytes.length;
    }
  };
  process.stdin.on('data', (data) => {
    let start = 0;
    for (let at = data.indexOf(10); at !== -1; at = data.indexOf(10, start)) {
      add(data.subarray(start, at));
      endLine();
      start = at + 1;
    }
    if (start < data.length) add(data.subarray(start));
  });
  process.stdin.on('end', () => {
    if (length > 0 || head !== null) endLine();
    // The host asks the piece to exit: store calls can no longer be answered; let the calls
    // in flight end (at most the protocol's grace period), then leave.
    for (const waiter of host.waiting.values()) waiter.reject(fatal('the host closed the connection'));
    host.waiting.clear();
    const deadline = Date.now() + 4000;
    const leave = () => (host.calls.size === 0 || Date.now() > deadline ? process.exit(0) : setTimeout(leave, 20));
    leave();
  });
}

module.exports = { serve, Host, wireError };
