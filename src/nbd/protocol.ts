/**
 * The NBD wire protocol (the NBD project's doc/proto.md, fixed newstyle; QEMU's docs/interop/nbd.txt for
 * the `qemu:` meta contexts): constants, and every message as an encode/decode pair. Big-endian
 * throughout. Decoders check lengths before reading and throw NbdProtocolError on malformed input.
 *
 * The server side needs to decode what clients send (client flags, options, requests) and encode what
 * it answers; the opposite directions exist for tests and small clients (test/nbd/raw-client.ts).
 */
import { NbdProtocolError } from './errors.js';

// ---------------------------------------------------------------------------------------------------
// Constants

export const NBD_MAGIC = 0x4e42444d41474943n; // 'NBDMAGIC'
export const IHAVEOPT = 0x49484156454f5054n; // 'IHAVEOPT'
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server) and client flags. */
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
export const FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_C_NO_ZEROES = 1 << 1;

/** Transmission flags. */
export const TF = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

export const OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

const ERR = 2 ** 31;
export const REP = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: ERR + 1,
  ERR_POLICY: ERR + 2,
  ERR_INVALID: ERR + 3,
  ERR_PLATFORM: ERR + 4,
  ERR_TLS_REQD: ERR + 5,
  ERR_UNKNOWN: ERR + 6,
  ERR_SHUTDOWN: ERR + 7,
  ERR_BLOCK_SIZE_REQD: ERR + 8,
  ERR_TOO_BIG: ERR + 9,
} as const;

export const INFO = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

export const CMD = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
  RESIZE: 8,
} as const;

export const CMD_FLAG = { FUA: 1 << 0, NO_HOLE: 1 << 1, DF: 1 << 2, REQ_ONE: 1 << 3, FAST_ZERO: 1 << 4 } as const;

export const REPLY_FLAG_DONE = 1 << 0;

export const REPLY_TYPE = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: 2 ** 15 + 1,
  ERROR_OFFSET: 2 ** 15 + 2,
} as const;

/** The error values the protocol allows (they equal Linux errno values). */
export const NBD_ERR = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

/** `base:allocation` flags. */
export const STATE_HOLE = 1 << 0;
export const STATE_ZERO = 1 << 1;
/** `qemu:dirty-bitmap:NAME` flag. */
export const STATE_DIRTY = 1 << 0;

export const CONTEXT_BASE_ALLOCATION = 'base:allocation';
export const DIRTY_BITMAP_PREFIX = 'qemu:dirty-bitmap:';

/** Largest READ/WRITE payload this server accepts (and advertises as the maximum block size). */
export const MAX_PAYLOAD = 32 * 1024 * 1024;
/** Largest option payload read during negotiation; larger ones are skipped and refused. */
export const MAX_OPTION_DATA = 64 * 1024;
/** Longest string (export name, description, query) the protocol allows. */
export const MAX_STRING = 4096;

export const HANDSHAKE_LENGTH = 18;
export const OPTION_HEADER_LENGTH = 16;
export const OPTION_REPLY_HEADER_LENGTH = 20;
export const REQUEST_HEADER_LENGTH = 28;
export const SIMPLE_REPLY_LENGTH = 16;
export const STRUCTURED_HEADER_LENGTH = 20;

const NAMES = {
  option: invert(OPT),
  reply: invert(REP),
  command: invert(CMD),
};
function invert(o: Record<string, number>): Map<number, string> {
  return new Map(Object.entries(o).map(([k, v]) => [v, k]));
}
const named = (prefix: string, names: Map<number, string>, what: string) => (n: number) => {
  const name = names.get(n);
  return name ? prefix + name : `${what} ${n}`;
};
/** `NBD_OPT_GO`, `NBD_REP_ERR_UNSUP`, `NBD_CMD_READ`; unknown values as `option 42` etc. */
export const optionName = named('NBD_OPT_', NAMES.option, 'option');
export const replyName = named('NBD_REP_', NAMES.reply, 'reply');
export const commandName = named('NBD_CMD_', NAMES.command, 'command');

// ---------------------------------------------------------------------------------------------------
// Small helpers

function need(buf: Uint8Array, n: number, what: string): void {
  if (buf.length < n) throw new NbdProtocolError(`${what}: ${buf.length} bytes, need ${n}`);
}

function asBuffer(b: Uint8Array): Buffer {
  return Buffer.isBuffer(b) ? b : Buffer.from(b.buffer, b.byteOffset, b.byteLength);
}

/** A u64 as a JS number; values past 2^53 come out inexact but larger than any disk, which range checks refuse. */
function readU64(buf: Buffer, at: number): number {
  return buf.readUInt32BE(at) * 2 ** 32 + buf.readUInt32BE(at + 4);
}

function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32BE(Math.floor(value / 2 ** 32), at);
  buf.writeUInt32BE(value >>> 0, at + 4);
}

/** A UTF-8 string of at most MAX_STRING bytes (without NUL), or a protocol error. */
function decodeString(buf: Buffer, what: string): string {
  if (buf.length > MAX_STRING) throw new NbdProtocolError(`${what} is ${buf.length} bytes (at most ${MAX_STRING})`);
  const s = buf.toString('utf8');
  if (s.includes('\0') || s.includes('\uFFFD')) throw new NbdProtocolError(`${what} is not valid UTF-8 text`);
  return s;
}

// ---------------------------------------------------------------------------------------------------
// Handshake

/** S: NBDMAGIC, IHAVEOPT, 16-bit handshake flags. */
export function encodeHandshake(flags: number): Buffer {
  const b = Buffer.allocUnsafe(HANDSHAKE_LENGTH);
  b.writeBigUInt64BE(NBD_MAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(flags, 16);
  return b;
}

export function decodeHandshake(buf: Uint8Array): { flags: number } {
  const b = asBuffer(buf);
  need(b, HANDSHAKE_LENGTH, 'handshake');
  if (b.readBigUInt64BE(0) !== NBD_MAGIC) throw new NbdProtocolError('handshake: not an NBD server (bad magic)');
  if (b.readBigUInt64BE(8) !== IHAVEOPT) throw new NbdProtocolError('handshake: not a newstyle NBD server');
  return { flags: b.readUInt16BE(16) };
}

/** C: 32-bit client flags. */
export function encodeClientFlags(flags: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(flags >>> 0, 0);
  return b;
}

export function decodeClientFlags(buf: Uint8Array): number {
  const b = asBuffer(buf);
  need(b, 4, 'client flags');
  return b.readUInt32BE(0);
}

// ---------------------------------------------------------------------------------------------------
// Options (client → server)

export interface OptionHeader {
  option: number;
  length: number;
}

export function encodeOption(option: number, data: Uint8Array = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(OPTION_HEADER_LENGTH + data.length);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(data.length, 12);
  b.set(data, OPTION_HEADER_LENGTH);
  return b;
}

export function decodeOptionHeader(buf: Uint8Array): OptionHeader {
  const b = asBuffer(buf);
  need(b, OPTION_HEADER_LENGTH, 'option header');
  if (b.readBigUInt64BE(0) !== IHAVEOPT) throw new NbdProtocolError('option header: bad magic (expected IHAVEOPT)');
  return { option: b.readUInt32BE(8), length: b.readUInt32BE(12) };
}

/** NBD_OPT_INFO / NBD_OPT_GO data: export name and the information items asked for. */
export interface InfoRequest {
  name: string;
  requests: number[];
}

export function encodeInfoRequest(r: InfoRequest): Buffer {
  const name = Buffer.from(r.name, 'utf8');
  const b = Buffer.allocUnsafe(4 + name.length + 2 + 2 * r.requests.length);
  b.writeUInt32BE(name.length, 0);
  name.copy(b, 4);
  b.writeUInt16BE(r.requests.length, 4 + name.length);
  r.requests.forEach((info, i) => b.writeUInt16BE(info, 6 + name.length + 2 * i));
  return b;
}

export function decodeInfoRequest(buf: Uint8Array): InfoRequest {
  const b = asBuffer(buf);
  need(b, 6, 'info request');
  const nameLength = b.readUInt32BE(0);
  if (nameLength > b.length - 6) throw new NbdProtocolError('info request: export name longer than the option');
  const name = decodeString(b.subarray(4, 4 + nameLength), 'export name');
  const count = b.readUInt16BE(4 + nameLength);
  if (b.length !== 6 + nameLength + 2 * count) {
    throw new NbdProtocolError(`info request: ${count} information items do not fit the option's length`);
  }
  const requests: number[] = [];
  for (let i = 0; i < count; i++) requests.push(b.readUInt16BE(6 + nameLength + 2 * i));
  return { name, requests };
}

/** NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data. */
export interface MetaContextRequest {
  name: string;
  queries: string[];
}

export function encodeMetaContextRequest(r: MetaContextRequest): Buffer {
  const name = Buffer.from(r.name, 'utf8');
  const queries = r.queries.map((q) => Buffer.from(q, 'utf8'));
  const b = Buffer.allocUnsafe(8 + name.length + queries.reduce((n, q) => n + 4 + q.length, 0));
  b.writeUInt32BE(name.length, 0);
  name.copy(b, 4);
  let at = 4 + name.length;
  b.writeUInt32BE(queries.length, at);
  at += 4;
  for (const q of queries) {
    b.writeUInt32BE(q.length, at);
    q.copy(b, at + 4);
    at += 4 + q.length;
  }
  return b;
}

export function decodeMetaContextRequest(buf: Uint8Array): MetaContextRequest {
  const b = asBuffer(buf);
  need(b, 8, 'meta context request');
  const nameLength = b.readUInt32BE(0);
  if (nameLength > b.length - 8) throw new NbdProtocolError('meta context request: export name longer than the option');
  const name = decodeString(b.subarray(4, 4 + nameLength), 'export name');
  let at = 4 + nameLength;
  const count = b.readUInt32BE(at);
  at += 4;
  // Each query takes at least its 4-byte length: a count beyond that cannot be honest.
  if (count > (b.length - at) / 4) throw new NbdProtocolError(`meta context request: ${count} queries cannot fit`);
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (b.length - at < 4) throw new NbdProtocolError('meta context request: truncated query length');
    const len = b.readUInt32BE(at);
    at += 4;
    if (len > b.length - at) throw new NbdProtocolError('meta context request: query longer than the option');
    queries.push(decodeString(b.subarray(at, at + len), 'meta context query'));
    at += len;
  }
  if (at !== b.length) throw new NbdProtocolError('meta context request: trailing bytes after the queries');
  return { name, queries };
}

// ---------------------------------------------------------------------------------------------------
// Option replies (server → client)

export interface OptionReplyHeader {
  option: number;
  type: number;
  length: number;
}

/** One option reply: header and data in one buffer (they are small). */
export function encodeOptionReply(option: number, type: number, data: Uint8Array = Buffer.alloc(0)): Buffer {
  const b = Buffer.allocUnsafe(OPTION_REPLY_HEADER_LENGTH + data.length);
  b.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type, 12);
  b.writeUInt32BE(data.length, 16);
  b.set(data, OPTION_REPLY_HEADER_LENGTH);
  return b;
}

export function decodeOptionReplyHeader(buf: Uint8Array): OptionReplyHeader {
  const b = asBuffer(buf);
  need(b, OPTION_REPLY_HEADER_LENGTH, 'option reply');
  if (b.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw new NbdProtocolError('option reply: bad magic');
  return { option: b.readUInt32BE(8), type: b.readUInt32BE(12), length: b.readUInt32BE(16) };
}

export const isErrorReply = (type: number): boolean => type >= ERR;

/** NBD_REP_SERVER data: name, then an optional description for people. */
export function encodeServerReplyData(name: string, description = ''): Buffer {
  const n = Buffer.from(name, 'utf8');
  const d = Buffer.from(description, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length + d.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  d.copy(b, 4 + n.length);
  return b;
}

export function decodeServerReplyData(buf: Uint8Array): { name: string; description: string } {
  const b = asBuffer(buf);
  need(b, 4, 'NBD_REP_SERVER');
  const len = b.readUInt32BE(0);
  if (len > b.length - 4) throw new NbdProtocolError('NBD_REP_SERVER: name longer than the reply');
  return { name: b.toString('utf8', 4, 4 + len), description: b.toString('utf8', 4 + len) };
}

/** NBD_REP_META_CONTEXT data: context id and name. */
export function encodeMetaContextReplyData(id: number, name: string): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.allocUnsafe(4 + n.length);
  b.writeUInt32BE(id, 0);
  n.copy(b, 4);
  return b;
}

export function decodeMetaContextReplyData(buf: Uint8Array): { id: number; name: string } {
  const b = asBuffer(buf);
  need(b, 4, 'NBD_REP_META_CONTEXT');
  return { id: b.readUInt32BE(0), name: b.toString('utf8', 4) };
}

/** NBD_REP_INFO items. */
export type InfoItem =
  | { info: typeof INFO.EXPORT; size: number; flags: number }
  | { info: typeof INFO.NAME; name: string }
  | { info: typeof INFO.DESCRIPTION; description: string }
  | { info: typeof INFO.BLOCK_SIZE; minimum: number; preferred: number; maximum: number }
  | { info: number; unknown: Buffer };

export function encodeInfoReplyData(item: InfoItem): Buffer {
  switch (item.info) {
    case INFO.EXPORT: {
      const it = item as Extract<InfoItem, { size: number }>;
      const b = Buffer.allocUnsafe(12);
      b.writeUInt16BE(INFO.EXPORT, 0);
      writeU64(b, it.size, 2);
      b.writeUInt16BE(it.flags, 10);
      return b;
    }
    case INFO.NAME:
    case INFO.DESCRIPTION: {
      const text = 'name' in item ? item.name : (item as { description: string }).description;
      const s = Buffer.from(text, 'utf8');
      const b = Buffer.allocUnsafe(2 + s.length);
      b.writeUInt16BE(item.info, 0);
      s.copy(b, 2);
      return b;
    }
    case INFO.BLOCK_SIZE: {
      const it = item as Extract<InfoItem, { minimum: number }>;
      const b = Buffer.allocUnsafe(14);
      b.writeUInt16BE(INFO.BLOCK_SIZE, 0);
      b.writeUInt32BE(it.minimum, 2);
      b.writeUInt32BE(it.preferred, 6);
      b.writeUInt32BE(it.maximum, 10);
      return b;
    }
    default: {
      const it = item as { info: number; unknown: Buffer };
      const b = Buffer.allocUnsafe(2 + it.unknown.length);
      b.writeUInt16BE(it.info, 0);
      it.unknown.copy(b, 2);
      return b;
    }
  }
}

export function decodeInfoReplyData(buf: Uint8Array): InfoItem {
  const b = asBuffer(buf);
  need(b, 2, 'NBD_REP_INFO');
  const info = b.readUInt16BE(0);
  switch (info) {
    case INFO.EXPORT:
      if (b.length !== 12) throw new NbdProtocolError(`NBD_INFO_EXPORT: length ${b.length}, expected 12`);
      return { info, size: readU64(b, 2), flags: b.readUInt16BE(10) };
    case INFO.NAME:
      return { info, name: b.toString('utf8', 2) };
    case INFO.DESCRIPTION:
      return { info, description: b.toString('utf8', 2) };
    case INFO.BLOCK_SIZE:
      if (b.length !== 14) throw new NbdProtocolError(`NBD_INFO_BLOCK_SIZE: length ${b.length}, expected 14`);
      return { info, minimum: b.readUInt32BE(2), preferred: b.readUInt32BE(6), maximum: b.readUInt32BE(10) };
    default:
      return { info, unknown: Buffer.from(b.subarray(2)) };
  }
}

/** The reply to NBD_OPT_EXPORT_NAME: size, transmission flags, and 124 zero bytes unless NO_ZEROES. */
export function encodeExportNameReply(size: number, flags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(noZeroes ? 10 : 134);
  writeU64(b, size, 0);
  b.writeUInt16BE(flags, 8);
  return b;
}

export function decodeExportNameReply(buf: Uint8Array): { size: number; flags: number } {
  const b = asBuffer(buf);
  need(b, 10, 'export name reply');
  return { size: readU64(b, 0), flags: b.readUInt16BE(8) };
}

// ---------------------------------------------------------------------------------------------------
// Transmission: requests (client → server)

export interface RequestHeader {
  flags: number;
  command: number;
  handle: bigint;
  offset: number;
  length: number;
}

export function encodeRequest(r: RequestHeader, data?: Uint8Array): Buffer {
  const b = Buffer.allocUnsafe(REQUEST_HEADER_LENGTH + (data?.length ?? 0));
  b.writeUInt32BE(REQUEST_MAGIC, 0);
  b.writeUInt16BE(r.flags, 4);
  b.writeUInt16BE(r.command, 6);
  b.writeBigUInt64BE(r.handle, 8);
  writeU64(b, r.offset, 16);
  b.writeUInt32BE(r.length, 24);
  if (data) b.set(data, REQUEST_HEADER_LENGTH);
  return b;
}

export function decodeRequestHeader(buf: Uint8Array): RequestHeader {
  const b = asBuffer(buf);
  need(b, REQUEST_HEADER_LENGTH, 'request');
  const magic = b.readUInt32BE(0);
  if (magic !== REQUEST_MAGIC) {
    throw new NbdProtocolError(`request: bad magic 0x${magic.toString(16).padStart(8, '0')}`);
  }
  return {
    flags: b.readUInt16BE(4),
    command: b.readUInt16BE(6),
    handle: b.readBigUInt64BE(8),
    offset: readU64(b, 16),
    length: b.readUInt32BE(24),
  };
}

// ---------------------------------------------------------------------------------------------------
// Transmission: replies (server → client)

export function encodeSimpleReply(error: number, handle: bigint): Buffer {
  const b = Buffer.allocUnsafe(SIMPLE_REPLY_LENGTH);
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  b.writeBigUInt64BE(handle, 8);
  return b;
}

export function decodeSimpleReply(buf: Uint8Array): { error: number; handle: bigint } {
  const b = asBuffer(buf);
  need(b, SIMPLE_REPLY_LENGTH, 'simple reply');
  if (b.readUInt32BE(0) !== SIMPLE_REPLY_MAGIC) throw new NbdProtocolError('simple reply: bad magic');
  return { error: b.readUInt32BE(4), handle: b.readBigUInt64BE(8) };
}

export interface ChunkHeader {
  flags: number;
  type: number;
  handle: bigint;
  length: number;
}

/** A structured reply chunk's header, with room for `extra` payload bytes written by the caller. */
function chunk(flags: number, type: number, handle: bigint, length: number, extra: number): Buffer {
  const b = Buffer.allocUnsafe(STRUCTURED_HEADER_LENGTH + extra);
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(handle, 8);
  b.writeUInt32BE(length, 16);
  return b;
}

export function encodeChunkHeader(h: ChunkHeader): Buffer {
  return chunk(h.flags, h.type, h.handle, h.length, 0);
}

export function decodeChunkHeader(buf: Uint8Array): ChunkHeader {
  const b = asBuffer(buf);
  need(b, STRUCTURED_HEADER_LENGTH, 'structured reply');
  if (b.readUInt32BE(0) !== STRUCTURED_REPLY_MAGIC) throw new NbdProtocolError('structured reply: bad magic');
  return {
    flags: b.readUInt16BE(4),
    type: b.readUInt16BE(6),
    handle: b.readBigUInt64BE(8),
    length: b.readUInt32BE(16),
  };
}

/** NBD_REPLY_TYPE_NONE with DONE: the end of a successful structured reply. */
export function encodeNoneChunk(handle: bigint): Buffer {
  return chunk(REPLY_FLAG_DONE, REPLY_TYPE.NONE, handle, 0, 0);
}

/** Header of an OFFSET_DATA chunk including its 8-byte offset; the `dataLength` bytes follow separately. */
export function encodeOffsetDataHeader(flags: number, handle: bigint, offset: number, dataLength: number): Buffer {
  const b = chunk(flags, REPLY_TYPE.OFFSET_DATA, handle, 8 + dataLength, 8);
  writeU64(b, offset, STRUCTURED_HEADER_LENGTH);
  return b;
}

export function encodeOffsetHole(flags: number, handle: bigint, offset: number, length: number): Buffer {
  const b = chunk(flags, REPLY_TYPE.OFFSET_HOLE, handle, 12, 12);
  writeU64(b, offset, STRUCTURED_HEADER_LENGTH);
  b.writeUInt32BE(length, STRUCTURED_HEADER_LENGTH + 8);
  return b;
}

/** One block-status descriptor: length and the context's flags. */
export interface StatusDescriptor {
  length: number;
  flags: number;
}

export function encodeBlockStatusChunk(
  flags: number,
  handle: bigint,
  contextId: number,
  descriptors: readonly StatusDescriptor[],
): Buffer {
  const n = 4 + 8 * descriptors.length;
  const b = chunk(flags, REPLY_TYPE.BLOCK_STATUS, handle, n, n);
  b.writeUInt32BE(contextId, STRUCTURED_HEADER_LENGTH);
  let at = STRUCTURED_HEADER_LENGTH + 4;
  for (const d of descriptors) {
    b.writeUInt32BE(d.length, at);
    b.writeUInt32BE(d.flags >>> 0, at + 4);
    at += 8;
  }
  return b;
}

export function encodeErrorChunk(flags: number, handle: bigint, error: number, message: string): Buffer {
  const m = truncateUtf8(message, 4096);
  const b = chunk(flags, REPLY_TYPE.ERROR, handle, 6 + m.length, 6 + m.length);
  b.writeUInt32BE(error, STRUCTURED_HEADER_LENGTH);
  b.writeUInt16BE(m.length, STRUCTURED_HEADER_LENGTH + 4);
  m.copy(b, STRUCTURED_HEADER_LENGTH + 6);
  return b;
}

export function encodeErrorOffsetChunk(
  flags: number,
  handle: bigint,
  error: number,
  message: string,
  offset: number,
): Buffer {
  const m = truncateUtf8(message, 4096);
  const b = chunk(flags, REPLY_TYPE.ERROR_OFFSET, handle, 14 + m.length, 14 + m.length);
  b.writeUInt32BE(error, STRUCTURED_HEADER_LENGTH);
  b.writeUInt16BE(m.length, STRUCTURED_HEADER_LENGTH + 4);
  m.copy(b, STRUCTURED_HEADER_LENGTH + 6);
  writeU64(b, offset, STRUCTURED_HEADER_LENGTH + 6 + m.length);
  return b;
}

/** A decoded structured chunk payload (the header's type says which). */
export type ChunkPayload =
  | { type: typeof REPLY_TYPE.NONE }
  | { type: typeof REPLY_TYPE.OFFSET_DATA; offset: number; data: Buffer }
  | { type: typeof REPLY_TYPE.OFFSET_HOLE; offset: number; length: number }
  | { type: typeof REPLY_TYPE.BLOCK_STATUS; contextId: number; descriptors: StatusDescriptor[] }
  | { type: typeof REPLY_TYPE.ERROR; error: number; message: string }
  | { type: typeof REPLY_TYPE.ERROR_OFFSET; error: number; message: string; offset: number }
  | { type: number; unknown: Buffer };

export function decodeChunkPayload(type: number, buf: Uint8Array): ChunkPayload {
  const b = asBuffer(buf);
  switch (type) {
    case REPLY_TYPE.NONE:
      if (b.length !== 0) throw new NbdProtocolError('NBD_REPLY_TYPE_NONE with a payload');
      return { type };
    case REPLY_TYPE.OFFSET_DATA:
      if (b.length < 9) throw new NbdProtocolError('OFFSET_DATA chunk shorter than 9 bytes');
      return { type, offset: readU64(b, 0), data: b.subarray(8) };
    case REPLY_TYPE.OFFSET_HOLE:
      if (b.length !== 12) throw new NbdProtocolError('OFFSET_HOLE chunk is not 12 bytes');
      return { type, offset: readU64(b, 0), length: b.readUInt32BE(8) };
    case REPLY_TYPE.BLOCK_STATUS: {
      if (b.length < 12 || (b.length - 4) % 8 !== 0) throw new NbdProtocolError('BLOCK_STATUS chunk of a bad length');
      const descriptors: StatusDescriptor[] = [];
      for (let at = 4; at < b.length; at += 8) {
        descriptors.push({ length: b.readUInt32BE(at), flags: b.readUInt32BE(at + 4) });
      }
      return { type, contextId: b.readUInt32BE(0), descriptors };
    }
    case REPLY_TYPE.ERROR:
    case REPLY_TYPE.ERROR_OFFSET: {
      need(b, 6, 'error chunk');
      const len = b.readUInt16BE(4);
      const tail = type === REPLY_TYPE.ERROR_OFFSET ? 8 : 0;
      if (6 + len + tail > b.length) throw new NbdProtocolError('error chunk: message longer than the chunk');
      const message = b.toString('utf8', 6, 6 + len);
      const error = b.readUInt32BE(0);
      if (type === REPLY_TYPE.ERROR) return { type, error, message };
      return { type, error, message, offset: readU64(b, 6 + len) };
    }
    default:
      return { type, unknown: Buffer.from(b) };
  }
}

/** At most `max` bytes of UTF-8, cut at a character boundary. */
function truncateUtf8(s: string, max: number): Buffer {
  const b = Buffer.from(s, 'utf8');
  if (b.length <= max) return b;
  let end = max;
  while (end > 0 && (b[end] & 0xc0) === 0x80) end--;
  return b.subarray(0, end);
}
