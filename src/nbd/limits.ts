/**
 * The NBD server's limits: what can be configured (with its default) and what is fixed. docs/cli.md
 * ("nbd serve", limits) lists the same table; keep them in step.
 */
import { TidemarkError } from '../errors.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** The configurable limits of a server. */
export interface NbdLimits {
  /** Connections at once; at the limit a new client takes the place of an idle or stalled one, if any. */
  maxConnections: number;
  /** Memory of all connections: requests in flight, payloads being received, replies not yet sent. */
  maxMemory: number;
  /** Memory of one connection (one message is always admitted when the connection holds nothing). */
  maxConnectionMemory: number;
  /** A client must finish negotiating (TLS handshake included) within this time. */
  handshakeTimeoutMs: number;
  /** A client that owes the server progress (a write payload, or taking its replies) and makes none. */
  stallTimeoutMs: number;
  /**
   * A connection with nothing in flight for this long is closed, but only while the server is under
   * pressure (at least IDLE_PRESSURE of maxConnections in use): idle VMs stay attached otherwise. 0: never.
   */
  idleTimeoutMs: number;
  /** How long a closing connection waits for its client to take the last replies. */
  closeTimeoutMs: number;
}

export const DEFAULT_LIMITS: Readonly<NbdLimits> = Object.freeze({
  maxConnections: 256,
  maxMemory: 512 * MiB,
  maxConnectionMemory: 64 * MiB,
  handshakeTimeoutMs: 10_000,
  stallTimeoutMs: 20_000,
  idleTimeoutMs: 5 * 60_000,
  closeTimeoutMs: 2_000,
});

/** Requests of one connection running at once (nbdcopy keeps 64 in flight, QEMU 16). */
export const MAX_REQUESTS_IN_FLIGHT = 128;
/**
 * Options a client may send before it enters transmission (as nbdkit: real clients send a handful),
 * and as many more per export after NBD_OPT_LIST (a client may ask about each). Beyond: dropped.
 */
export const MAX_OPTIONS = 32;
/** Option replies a negotiating client may leave unread before the server stops reading its options. */
export const NEGOTIATION_MEMORY = 64 * KiB;
/** A connection that made no progress for this long is stalled: the first to make room for a new client. */
export const STALLED_AFTER_MS = 1_000;
/**
 * A connection gives way to a new client only once it has been idle, or negotiating, for this long:
 * a client between its GO and its first request, or in the middle of its handshake, is not pushed out
 * by a flood of newcomers.
 */
export const SETTLED_MS = 100;
/**
 * While a client that is not stalled waits for memory, a connection holding memory that has made no
 * progress for this long is dropped (the one holding the most first): stalled clients cannot keep
 * others waiting until the stall timeout.
 */
export const PRESSURE_STALL_MS = 500;
/** How often the server looks for stalls, starving clients and idle connections. */
export const SWEEP_MS = 100;
/** The share of maxConnections in use from which idle connections are closed after idleTimeoutMs. */
export const IDLE_PRESSURE = 3 / 4;

/** The limits with defaults filled in; a value that makes no sense is an INVALID_ARGUMENT. */
export function resolveLimits(opts: Partial<NbdLimits>): NbdLimits {
  const out = { ...DEFAULT_LIMITS };
  for (const key of Object.keys(DEFAULT_LIMITS) as (keyof NbdLimits)[]) {
    const v = opts[key];
    if (v === undefined) continue;
    const min = key === 'idleTimeoutMs' ? 0 : 1;
    if (!Number.isSafeInteger(v) || v < min) {
      throw new TidemarkError('INVALID_ARGUMENT', `NBD server option ${key} = ${v}: expected an integer ≥ ${min}`);
    }
    out[key] = v;
  }
  return out;
}
