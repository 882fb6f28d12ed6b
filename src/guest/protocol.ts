/**
 * Messages of the QEMU guest-agent protocol (qga/qapi-schema.json): requests `{"execute", "arguments"?, "id"?}`,
 * answers `{"return": ...}` or `{"error": {"class", "desc"}}`, echoing the request's `id` when it had one.
 * Shared by the client and the reference agent.
 */
import { type ErrorCode, TidemarkErrorBase } from '../errors.js';

export type FreezeStatus = 'frozen' | 'thawed';

export interface AgentErrorBody {
  /** QAPI error class: GenericError, CommandNotFound, ... */
  class: string;
  desc: string;
}

export type AgentResponse =
  { kind: 'return'; value: unknown; id?: unknown } | { kind: 'error'; error: AgentErrorBody; id?: unknown };

export type ParsedResponse = AgentResponse | { kind: 'garbage'; reason: string };

/** The commands this project speaks (both sides). */
export const COMMANDS = {
  sync: 'guest-sync',
  syncDelimited: 'guest-sync-delimited',
  ping: 'guest-ping',
  info: 'guest-info',
  freezeStatus: 'guest-fsfreeze-status',
  freeze: 'guest-fsfreeze-freeze',
  thaw: 'guest-fsfreeze-thaw',
} as const;

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** One line from the agent: an answer, or garbage (with why, for the error message). */
export function parseResponse(text: string): ParsedResponse {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (err) {
    return { kind: 'garbage', reason: `not JSON (${(err as Error).message})` };
  }
  if (!isPlainObject(v)) return { kind: 'garbage', reason: 'not a JSON object' };
  const id = 'id' in v ? v.id : undefined;
  if ('return' in v) return { kind: 'return', value: v.return, id };
  if ('error' in v) {
    const e = v.error;
    if (isPlainObject(e) && typeof e.class === 'string' && typeof e.desc === 'string') {
      return { kind: 'error', error: { class: e.class, desc: e.desc }, id };
    }
    return { kind: 'garbage', reason: 'an "error" member without a class and desc' };
  }
  return { kind: 'garbage', reason: 'neither "return" nor "error"' };
}

/** A request, newline-terminated. */
export function encodeRequest(execute: string, args?: Record<string, unknown>, id?: string | number): Buffer {
  const msg: Record<string, unknown> = { execute };
  if (args !== undefined) msg.arguments = args;
  if (id !== undefined) msg.id = id;
  return Buffer.from(JSON.stringify(msg) + '\n', 'utf8');
}

export function encodeReturn(value: unknown, id?: unknown): Buffer {
  const msg: Record<string, unknown> = { return: value };
  if (id !== undefined) msg.id = id;
  return Buffer.from(JSON.stringify(msg) + '\n', 'utf8');
}

export function encodeError(error: AgentErrorBody, id?: unknown): Buffer {
  const msg: Record<string, unknown> = { error: { class: error.class, desc: error.desc } };
  if (id !== undefined) msg.id = id;
  return Buffer.from(JSON.stringify(msg) + '\n', 'utf8');
}

/** qemu-ga's wording, so that tools written against it recognise ours. */
export const agentErrors = {
  notFound: (cmd: string): AgentErrorBody => ({
    class: 'CommandNotFound',
    desc: `The command ${cmd} has not been found`,
  }),
  disabled: (cmd: string, why?: string): AgentErrorBody => ({
    class: 'CommandNotFound',
    desc: `Command ${cmd} has been disabled${why ? `: ${why}` : ''}`,
  }),
  generic: (desc: string): AgentErrorBody => ({ class: 'GenericError', desc }),
};

/**
 * An error about the guest channel. `agentClass`/`agentDesc` are set when the agent itself answered with an error;
 * `cannotFreeze` says, in words, why the guest could not be frozen when that is what failed.
 */
export class GuestAgentError extends TidemarkErrorBase {
  readonly command: string | undefined;
  readonly agentClass: string | undefined;
  readonly agentDesc: string | undefined;
  cannotFreeze: string | undefined;

  constructor(
    code: ErrorCode,
    message: string,
    info: { command?: string; agentClass?: string; agentDesc?: string; cannotFreeze?: string } = {},
    details: Record<string, unknown> = {},
    options?: ErrorOptions,
  ) {
    super(code, message, { ...details, ...info }, options);
    this.name = 'GuestAgentError';
    this.command = info.command;
    this.agentClass = info.agentClass;
    this.agentDesc = info.agentDesc;
    this.cannotFreeze = info.cannotFreeze;
  }
}

/** Whether the agent says it does not have (or has switched off) the command. */
export function isCommandUnavailable(e: AgentErrorBody): boolean {
  // CommandDisabled is what qemu-ga before 1.x called it; CommandNotFound covers both since.
  return e.class === 'CommandNotFound' || e.class === 'CommandDisabled';
}

/** The typed error for an error answer to `command`. */
export function errorFromAgent(command: string, e: AgentErrorBody): GuestAgentError {
  const unavailable = isCommandUnavailable(e);
  const code: ErrorCode = unavailable ? 'NOT_SUPPORTED' : 'GUEST_AGENT_ERROR';
  const what = unavailable
    ? /disabled/i.test(e.desc)
      ? `the guest agent has ${command} disabled`
      : `the guest agent does not know ${command}`
    : `the guest agent failed ${command}`;
  const err = new GuestAgentError(code, `${what}: ${e.desc} (${e.class})`, {
    command,
    agentClass: e.class,
    agentDesc: e.desc,
  });
  if (command === COMMANDS.freeze) err.cannotFreeze = `${what}: ${e.desc}`;
  return err;
}
