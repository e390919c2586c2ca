'use strict';
// The egress policy (`[egress]`, sent in `describe`) for everything a piece's code connects
// to, as the Rust SDK's guard holds it (docs/security.md, "Outbound calls"): decided by the
// address connected to. Every TCP connection of the process — `fetch`, `http`, `https`,
// axios — goes through `net.Socket#connect`, so that is where the guard stands: an IP
// literal is checked as it is, a name is resolved by the guard's lookup, which hands the
// socket only addresses the policy allows. Plain `http:` is refused by `fetch`, `http.request`
// and `http.get` when the policy is `https_only`.

const { AsyncLocalStorage } = require('node:async_hooks');
const dns = require('node:dns');
const net = require('node:net');
const http = require('node:http');
const https = require('node:https');

/**
 * The call a piece's code runs for, as far as its outbound requests go: `{maxResponseBytes,
 * signal}` — the signal aborts when piecework cancels the call.
 */
const callLimits = new AsyncLocalStorage();

class EgressDenied extends Error {
  constructor(message) {
    super(`egress refused: ${message}`);
    this.name = 'EgressDenied';
    this.code = 'EGRESS_DENIED';
  }
}

/** `a.b.c.d` → 32-bit number. */
function v4(text) {
  return text.split('.').reduce((n, part) => n * 256 + Number(part), 0);
}

/** An IPv6 address as 8 numbers, `::` expanded, an IPv4 tail folded in. */
function v6Segments(text) {
  let address = text.replace(/^\[|\]$/g, '').split('%')[0];
  const tail = /(\d+\.\d+\.\d+\.\d+)$/.exec(address);
  if (tail) {
    const n = v4(tail[1]);
    address = address.slice(0, -tail[1].length) + `${(n >>> 16).toString(16)}:${(n & 0xffff).toString(16)}`;
  }
  const [head, rest] = address.split('::');
  const parts = (s) => (s ? s.split(':').map((p) => parseInt(p, 16)) : []);
  const first = parts(head);
  const last = rest === undefined ? [] : parts(rest);
  const zeros = rest === undefined ? 0 : 8 - first.length - last.length;
  return [...first, ...Array(zeros).fill(0), ...last];
}

const dotted = (n) => [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join('.');

/** An address as the connection reaches it: IPv4 carried in IPv6 forms comes out as IPv4. */
function canonical(address) {
  if (net.isIPv4(address)) return { family: 4, text: address };
  const s = v6Segments(address);
  const low = () => dotted(((s[6] << 16) | s[7]) >>> 0);
  const zero = (from, to) => s.slice(from, to).every((x) => x === 0);
  if (zero(0, 5) && s[5] === 0xffff) return { family: 4, text: low() }; // mapped
  if (zero(0, 6) && (s[6] !== 0 || s[7] > 1)) return { family: 4, text: low() }; // compatible
  if (s[0] === 0x64 && s[1] === 0xff9b && zero(2, 6)) return { family: 4, text: low() }; // NAT64
  if (s[0] === 0x2002) return { family: 4, text: dotted(((s[1] << 16) | s[2]) >>> 0) }; // 6to4
  return { family: 6, text: s.map((x) => x.toString(16)).join(':'), segments: s };
}

const METADATA_V4 = ['169.254.169.254', '100.100.100.200', '192.0.0.192'];

/** The internal or special-purpose range an address is in, or null. */
function internalRange(address) {
  const ip = canonical(address);
  if (ip.family === 4) {
    const [a, b, c] = ip.text.split('.').map(Number);
    if (METADATA_V4.includes(ip.text)) return 'cloud metadata';
    if (a === 0) return 'unspecified (this host)';
    if (a === 10 || (a === 172 && b >= 16 && b <= 31) || (a === 192 && b === 168)) return 'private (RFC 1918)';
    if (a === 100 && b >= 64 && b <= 127) return 'shared (CGNAT)';
    if (a === 127) return 'loopback';
    if (a === 169 && b === 254) return 'link-local';
    if (a === 192 && b === 0 && (c === 0 || c === 2)) return 'reserved';
    if (a === 198 && (b === 18 || b === 19)) return 'reserved (benchmarking)';
    if ((a === 198 && b === 51 && c === 100) || (a === 203 && b === 0 && c === 113)) return 'reserved (documentation)';
    if (a >= 224 && a <= 239) return 'multicast';
    if (a >= 240) return 'reserved';
    return null;
  }
  const s = ip.segments;
  const is = (...x) => x.every((v, i) => s[i] === v);
  if (is(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)) return 'cloud metadata';
  if (s.every((x) => x === 0)) return 'unspecified (this host)';
  if (is(0, 0, 0, 0, 0, 0, 0, 1)) return 'loopback';
  if (s[0] === 0 && s.slice(1, 6).every((x) => x === 0)) return 'reserved';
  if (s[0] === 0x64 && s[1] === 0xff9b) return 'reserved (local NAT64)';
  if (s[0] === 0x100 && s.slice(1, 4).every((x) => x === 0)) return 'reserved (discard)';
  if (s[0] === 0x2001 && s[1] === 0) return 'reserved (Teredo)';
  if (s[0] === 0x2001 && s[1] === 0xdb8) return 'reserved (documentation)';
  if (s[0] >= 0xfc00 && s[0] <= 0xfdff) return 'unique-local';
  if (s[0] >= 0xfe80 && s[0] <= 0xfebf) return 'link-local';
  if (s[0] >= 0xfec0 && s[0] <= 0xfeff) return 'site-local';
  if (s[0] >= 0xff00) return 'multicast';
  return null;
}

/** A list of networks, addresses and host patterns (`*.corp.internal`). */
function matcher(entries) {
  const blocks = new net.BlockList();
  const hosts = [];
  for (const entry of entries ?? []) {
    const [address, bits] = String(entry).split('/');
    const bare = address.replace(/^\[|\]$/g, '');
    const family = net.isIPv4(bare) ? 'ipv4' : net.isIPv6(bare) ? 'ipv6' : null;
    if (family && bits !== undefined) blocks.addSubnet(bare, Number(bits), family);
    else if (family) blocks.addAddress(bare, family);
    else hosts.push(String(entry).toLowerCase());
  }
  return {
    empty: (entries ?? []).length === 0,
    address(ip) {
      const c = canonical(ip);
      return blocks.check(c.text, c.family === 4 ? 'ipv4' : 'ipv6') || blocks.check(ip, net.isIPv4(ip) ? 'ipv4' : 'ipv6');
    },
    host(name) {
      const lower = String(name).toLowerCase().replace(/\.$/, '');
      return hosts.some((p) => (p.startsWith('*.') ? lower.endsWith(p.slice(1)) : lower === p));
    },
  };
}

class Guard {
  constructor(policy) {
    this.allow = matcher(policy?.allow);
    this.allowHosts = matcher(policy?.allow_hosts);
    this.denyHosts = matcher(policy?.deny_hosts);
    this.httpsOnly = Boolean(policy?.https_only);
    this.maxResponseBytes = Number(policy?.max_response_bytes) || 0;
  }

  /** Refuses a host name by the lists, before any lookup. */
  checkHost(host) {
    if (this.denyHosts.host(host)) throw new EgressDenied(`host ${host} is denied`);
    if (!this.allowHosts.empty && !this.allowHosts.host(host) && !net.isIP(host.replace(/^\[|\]$/g, ''))) {
      throw new EgressDenied(`host ${host} is not in allow_hosts`);
    }
  }

  /** Why `address` (reached for `host`) may not be connected to, or null. */
  refusal(host, address) {
    if (this.denyHosts.address(address)) return `${host} (${address}) is denied`;
    if (!this.allowHosts.empty && net.isIP(host.replace(/^\[|\]$/g, '')) && !this.allowHosts.address(address)) {
      return `${address} is not in allow_hosts`;
    }
    const range = internalRange(address);
    if (range && !this.allow.address(address) && !this.allow.host(host)) {
      return `${host} resolves to ${address}, a ${range} address (allow it with [egress] allow)`;
    }
    return null;
  }

  checkScheme(url) {
    if (this.httpsOnly && String(url).toLowerCase().startsWith('http:')) {
      throw new EgressDenied(`plain http is refused (https_only): use https for ${new URL(url).host}`);
    }
  }

  /** A `dns.lookup` that only answers addresses the policy allows for `host`. */
  lookup(host) {
    return (hostname, options, callback) => {
      const opts = typeof options === 'object' ? options : { family: options };
      dns.lookup(hostname, { ...opts, all: true }, (err, addresses) => {
        if (err) return callback(err);
        const allowed = addresses.filter((a) => this.refusal(host, a.address) === null);
        if (allowed.length === 0) {
          return callback(new EgressDenied(this.refusal(host, addresses[0]?.address ?? '') ?? `${host} has no address`));
        }
        if (opts.all) return callback(null, allowed);
        return callback(null, allowed[0].address, allowed[0].family);
      });
    };
  }
}

/** Holds every connection of this process to `policy`. */
function install(policy) {
  const guard = new Guard(policy);
  const connect = net.Socket.prototype.connect;
  net.Socket.prototype.connect = function guardedConnect(...args) {
    // `net.connect` and `tls.connect` pass `[options, callback]` (normalized); callers may
    // also pass `(options, cb)` or `(port, host, cb)`, or a path for a local socket.
    const normalized = Array.isArray(args[0]) ? args[0] : null;
    const options = normalized ? normalized[0] : typeof args[0] === 'object' && args[0] !== null ? args[0] : null;
    if (!options) {
      if (typeof args[0] === 'string' && isNaN(Number(args[0]))) return connect.apply(this, args);
      const host = typeof args[1] === 'string' ? args[1] : 'localhost';
      const callback = args.find((a) => typeof a === 'function');
      return this.connect({ port: args[0], host }, ...(callback ? [callback] : []));
    }
    if (options.path !== undefined) return connect.apply(this, args);
    const host = String(options.host ?? 'localhost');
    try {
      guard.checkHost(host);
      const literal = host.replace(/^\[|\]$/g, '');
      if (net.isIP(literal)) {
        const why = guard.refusal(host, literal);
        if (why) throw new EgressDenied(why);
        return connect.apply(this, args);
      }
    } catch (err) {
      process.nextTick(() => this.destroy(err));
      return this;
    }
    const guarded = { ...options, lookup: guard.lookup(host) };
    if (normalized) {
      const copy = [guarded, ...normalized.slice(1)];
      for (const symbol of Object.getOwnPropertySymbols(normalized)) copy[symbol] = normalized[symbol];
      return connect.call(this, copy, ...args.slice(1));
    }
    return connect.call(this, guarded, ...args.slice(1));
  };
  const fetch = globalThis.fetch;
  if (fetch) {
    globalThis.fetch = function guardedFetch(input, init) {
      const url = typeof input === 'string' || input instanceof URL ? String(input) : input?.url;
      try {
        guard.checkScheme(url);
      } catch (err) {
        return Promise.reject(err);
      }
      // Redirects are followed by hand, so each hop is checked like the first; the body
      // is read no further than the call's (or the installation's) max_response_bytes.
      const call = callLimits.getStore();
      const max = call?.maxResponseBytes || guard.maxResponseBytes;
      // A cancelled call's requests are aborted, unless the piece brought its own signal.
      if (call?.signal && !init?.signal) init = { ...init, signal: call.signal };
      return followed(fetch, guard, input, init).then((response) => limited(response, max));
    };
  }
  for (const module of [http, https]) {
    for (const method of ['request', 'get']) {
      const original = module[method];
      module[method] = function guardedRequest(...args) {
        if (module === http && guard.httpsOnly) throw new EgressDenied('plain http is refused (https_only)');
        const request = original.apply(this, args);
        // Responses read through `http`/`https` (axios, got, the SDKs of most services)
        // are held to the same limit as fetch's, and end with a cancelled call.
        const call = callLimits.getStore();
        const max = call?.maxResponseBytes || guard.maxResponseBytes;
        if (max) request.on('response', (response) => holdTo(request, response, max));
        if (call?.signal) abortWith(request, call.signal);
        return request;
      };
    }
  }
  return guard;
}

/** Destroys `request` when `signal` aborts (the call it was made for was cancelled). */
function abortWith(request, signal) {
  const abort = () => request.destroy(new Error('cancelled: the call was stopped'));
  if (signal.aborted) return process.nextTick(abort);
  signal.addEventListener('abort', abort, { once: true });
  request.once('close', () => signal.removeEventListener('abort', abort));
}

/**
 * Fails `request` once its `response`'s body passes `max` bytes. The bytes
 * are counted where the parser pushes them, so how the caller reads the body (events, pipe,
 * async iteration) is left as it was.
 */
function holdTo(request, response, max) {
  const tooLarge = () => new Error(`the response from ${request.host ?? 'the server'} is larger than ${max} bytes (max_response_bytes)`);
  // The request fails with the reason: callers listen for its errors, not always for the
  // response's.
  let seen = 0;
  const push = response.push;
  response.push = function countedPush(chunk, encoding) {
    // Past the limit nothing more gets through, not even the end of the body: the reader
    // must see the failure, never a body cut short.
    if (seen > max) return false;
    if (chunk) {
      seen += chunk.length;
      if (seen > max) {
        request.destroy(tooLarge());
        return false;
      }
    }
    return push.call(this, chunk, encoding);
  };
}

/** `response`, failing as soon as its body passes `max` bytes (0: no limit). */
function limited(response, max) {
  if (!max || !response.body) return response;
  const host = (() => {
    try {
      return new URL(response.url).host;
    } catch {
      return 'the server';
    }
  })();
  const tooLarge = () => new Error(`the response from ${host} is larger than ${max} bytes (max_response_bytes)`);
  const declared = Number(response.headers.get('content-length'));
  if (declared > max) throw tooLarge();
  let seen = 0;
  const counted = response.body.pipeThrough(
    new TransformStream({
      transform(chunk, controller) {
        seen += chunk.byteLength;
        if (seen > max) controller.error(tooLarge());
        else controller.enqueue(chunk);
      },
    }),
  );
  return new Response(counted, { status: response.status, statusText: response.statusText, headers: response.headers });
}

async function followed(fetch, guard, input, init) {
  if (init?.redirect === 'manual' || init?.redirect === 'error') return fetch(input, init);
  let request = new Request(input, init);
  for (let hop = 0; hop < 10; hop++) {
    const response = await fetch(request, { redirect: 'manual' });
    const location = response.headers.get('location');
    if (response.status < 300 || response.status >= 400 || !location) return response;
    const next = new URL(location, request.url);
    guard.checkScheme(next.href);
    const keepBody = response.status === 307 || response.status === 308;
    request = new Request(next, {
      method: keepBody ? request.method : request.method === 'HEAD' ? 'HEAD' : 'GET',
      headers: request.headers,
      body: keepBody ? request.body : undefined,
      duplex: 'half',
    });
  }
  throw new EgressDenied('more than 10 redirects');
}

module.exports = { install, internalRange, canonical, callLimits, EgressDenied };
