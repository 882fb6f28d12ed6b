/**
 * The object envelope: how every chunk, index, manifest, pack header and pack index is stored (docs/formats/repository.md §3).
 *
 *   0  magic "TMOB"   4  version u8 = 1   5  type u8   6  flags u8   7  reserved u8 = 0
 *   8  plainLength u32 LE   12  bodyLength u32 LE   16  body (bodyLength bytes)
 *
 * flags: bit 0 zstd (else the payload is the plaintext), bit 1 AES-256-GCM (body = nonce 12 | ciphertext | tag 16,
 * additional data = header | object name), bit 2 SHA-256 trailer (body = payload | SHA-256(header | payload)),
 * bit 3 (manifests of unencrypted repositories with an integrity key; with bit 2) HMAC-SHA-256 trailer after it:
 * HMAC(manifest key, header | payload | SHA-256 trailer | object name).
 *
 * This file is also the entry of the codec worker threads (pool.ts), which run its compiled form: it imports only
 * node built-ins and errors.js (the zstd binding is handed in).
 */
import { createCipheriv, createDecipheriv, createHash, createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { createRequire } from 'node:module';
import { isMainThread, parentPort, workerData } from 'node:worker_threads';
import { TidemarkErrorBase } from '../errors.js';

export const HEADER_SIZE = 16;
export const NONCE_SIZE = 12;
export const TAG_SIZE = 16;
export const CHECKSUM_SIZE = 32;
export const MAC_SIZE = 32;
/** Most bytes an envelope other than a manifest adds to its plaintext (header + the larger of nonce+tag and the checksum). */
export const MAX_OVERHEAD = HEADER_SIZE + Math.max(NONCE_SIZE + TAG_SIZE, CHECKSUM_SIZE);
/** Most bytes a manifest's envelope adds: the header, the checksum and the MAC. */
export const MAX_MANIFEST_OVERHEAD = HEADER_SIZE + CHECKSUM_SIZE + MAC_SIZE;
const MAGIC = Buffer.from('TMOB', 'latin1');
const VERSION = 1;
const FLAG_ZSTD = 1;
const FLAG_GCM = 2;
const FLAG_CHECKSUM = 4;
const FLAG_MAC = 8;
const KNOWN_FLAGS = FLAG_ZSTD | FLAG_GCM | FLAG_CHECKSUM | FLAG_MAC;

export type ObjectType = 'chunk' | 'index' | 'manifest' | 'pack-header' | 'pack-index';
const TYPE_CODE: Record<ObjectType, number> = { chunk: 1, index: 2, manifest: 3, 'pack-header': 4, 'pack-index': 5 };

/** The part of zstd-napi's low-level binding this file uses (single-shot calls into caller-sized buffers). */
export interface ZstdBinding {
  CCtx: new () => { compress(dst: Uint8Array, src: Uint8Array, level: number): number };
  DCtx: new () => { decompress(dst: Uint8Array, src: Uint8Array): number };
  compressBound(size: number): number;
}

/** `problem` says what verify reports; the caller wraps it with the object's key (pool.ts, store.ts). */
export class EnvelopeError extends TidemarkErrorBase {
  constructor(
    code: 'REPOSITORY_CORRUPT' | 'NOT_SUPPORTED',
    readonly problem: 'truncated' | 'corrupt',
    message: string,
  ) {
    super(code, message);
    this.name = 'EnvelopeError';
  }
}

const corrupt = (msg: string) => new EnvelopeError('REPOSITORY_CORRUPT', 'corrupt', msg);

export interface SealOptions {
  type: ObjectType;
  /** the object's name (key): bound into the GCM additional data, so objects cannot be swapped */
  name: string;
  /** add a SHA-256 trailer when not encrypted (objects whose name is not their hash: manifests) */
  checksum?: boolean;
}

/**
 * Seals and opens envelopes with one key (or none) and one zstd level. Synchronous: run it on a worker (pool.ts)
 * to keep the main thread free. Keeps one compression context and scratch buffer for reuse.
 */
export class EnvelopeCodec {
  private cctx: { compress(dst: Uint8Array, src: Uint8Array, level: number): number } | null = null;
  private dctx: { decompress(dst: Uint8Array, src: Uint8Array): number } | null = null;
  private scratch: Buffer = Buffer.alloc(0);

  constructor(
    private readonly zstd: ZstdBinding,
    private readonly key: Buffer | null,
    private readonly level: number,
    /**
     * The manifest key of an unencrypted repository with an integrity key: manifests are sealed with the MAC
     * trailer, and a manifest without one, or whose MAC does not match, does not open. Null: manifests are not
     * authenticated (a MAC trailer is then skipped, not checked).
     */
    private readonly macKey: Buffer | null = null,
  ) {
    if (key !== null && key.length !== 32) throw new Error('envelope key must be 32 bytes');
    if (macKey !== null && (macKey.length !== 32 || key !== null))
      throw new Error('a MAC key is 32 bytes, unencrypted only');
  }

  /** Seals `plain`; the result goes into `into` when it is large enough (a buffer handed back for reuse). */
  seal(plain: Uint8Array, opts: SealOptions, into?: ArrayBuffer): Buffer {
    if (plain.length > 0xffffffff) throw new RangeError('object larger than 4 GiB');
    this.cctx ??= new this.zstd.CCtx();
    const bound = this.zstd.compressBound(plain.length);
    if (this.scratch.length < bound) this.scratch = Buffer.allocUnsafe(bound);
    const packed = this.cctx.compress(this.scratch, plain, this.level);
    // Incompressible data is stored as it is: a stored payload is never longer than its plaintext.
    const zstd = packed < plain.length;
    const payload = zstd ? this.scratch.subarray(0, packed) : plain;
    const encrypted = this.key !== null;
    const mac = this.macKey !== null && opts.type === 'manifest';
    const checksum = !encrypted && (opts.checksum === true || mac);
    const bodyLength =
      payload.length + (encrypted ? NONCE_SIZE + TAG_SIZE : 0) + (checksum ? CHECKSUM_SIZE : 0) + (mac ? MAC_SIZE : 0);
    const out =
      into && into.byteLength >= HEADER_SIZE + bodyLength
        ? Buffer.from(into, 0, HEADER_SIZE + bodyLength)
        : Buffer.allocUnsafeSlow(HEADER_SIZE + bodyLength);
    MAGIC.copy(out, 0);
    out[4] = VERSION;
    out[5] = TYPE_CODE[opts.type];
    out[6] =
      (zstd ? FLAG_ZSTD : 0) | (encrypted ? FLAG_GCM : 0) | (checksum ? FLAG_CHECKSUM : 0) | (mac ? FLAG_MAC : 0);
    out[7] = 0;
    out.writeUInt32LE(plain.length, 8);
    out.writeUInt32LE(bodyLength, 12);
    if (encrypted) {
      const nonce = randomBytes(NONCE_SIZE);
      nonce.copy(out, HEADER_SIZE);
      const cipher = createCipheriv('aes-256-gcm', this.key!, nonce, { authTagLength: TAG_SIZE });
      cipher.setAAD(additionalData(out, opts.name));
      let at = HEADER_SIZE + NONCE_SIZE;
      at += cipher.update(payload).copy(out, at);
      at += cipher.final().copy(out, at);
      cipher.getAuthTag().copy(out, at);
    } else {
      out.set(payload, HEADER_SIZE);
      if (checksum) {
        const end = HEADER_SIZE + payload.length;
        createHash('sha256').update(out.subarray(0, end)).digest().copy(out, end);
        if (mac)
          manifestMac(this.macKey!, out.subarray(0, end + CHECKSUM_SIZE), opts.name).copy(out, end + CHECKSUM_SIZE);
      }
    }
    return out;
  }

  /**
   * Opens an envelope: every length is checked before anything is allocated, the plaintext may be at most
   * `maxPlain` bytes. Damage to an encrypted or checksummed envelope, or to any header, throws EnvelopeError
   * (truncated or corrupt). An unencrypted envelope without a checksum (chunks, indexes, pack indexes) may open
   * after damage to its payload — to other bytes, or to the original ones — and its caller must re-hash the result
   * against the object's name (checkContentId): that check, not this one, is what refuses damage there.
   */
  open(stored: Uint8Array, type: ObjectType, name: string, maxPlain: number, allowView = false): Buffer {
    const buf = Buffer.from(stored.buffer, stored.byteOffset, stored.byteLength);
    if (buf.length < HEADER_SIZE) {
      throw new EnvelopeError(
        'REPOSITORY_CORRUPT',
        'truncated',
        `truncated: ${buf.length} bytes, shorter than a header`,
      );
    }
    if (!buf.subarray(0, 4).equals(MAGIC)) throw corrupt('not a Tidemark object (bad magic)');
    if (buf[4] !== VERSION) {
      throw new EnvelopeError('NOT_SUPPORTED', 'corrupt', `object format version ${buf[4]} is not supported (1 is)`);
    }
    if (buf[5] !== TYPE_CODE[type]) throw corrupt(`object type ${buf[5]} where a ${type} (${TYPE_CODE[type]}) belongs`);
    const flags = buf[6];
    if ((flags & ~KNOWN_FLAGS) !== 0 || buf[7] !== 0) throw corrupt(`unknown flags 0x${flags.toString(16)}`);
    const encrypted = (flags & FLAG_GCM) !== 0;
    if (encrypted !== (this.key !== null)) {
      throw corrupt(
        encrypted ? 'encrypted object in an unencrypted repository' : 'unencrypted object in an encrypted repository',
      );
    }
    if (encrypted && (flags & FLAG_CHECKSUM) !== 0) throw corrupt('both encrypted and checksummed');
    const hasMac = (flags & FLAG_MAC) !== 0;
    if (hasMac && (type !== 'manifest' || (flags & FLAG_CHECKSUM) === 0)) {
      throw corrupt(`a MAC flag on a ${type}${type === 'manifest' ? ' without a checksum' : ''}`);
    }
    if (this.macKey !== null && type === 'manifest' && !hasMac) {
      throw corrupt("not authenticated with the repository's integrity key: forged, or written without the key");
    }
    const plainLength = buf.readUInt32LE(8);
    const bodyLength = buf.readUInt32LE(12);
    if (plainLength > maxPlain) throw corrupt(`claims ${plainLength} bytes of data, more than the ${maxPlain} allowed`);
    if (buf.length - HEADER_SIZE < bodyLength) {
      throw new EnvelopeError(
        'REPOSITORY_CORRUPT',
        'truncated',
        `truncated: ${buf.length} bytes, the header says ${HEADER_SIZE + bodyLength}`,
      );
    }
    if (buf.length - HEADER_SIZE > bodyLength) {
      throw corrupt(`${buf.length - HEADER_SIZE - bodyLength} bytes after the end the header gives`);
    }
    const extra = encrypted
      ? NONCE_SIZE + TAG_SIZE
      : ((flags & FLAG_CHECKSUM) !== 0 ? CHECKSUM_SIZE : 0) + (hasMac ? MAC_SIZE : 0);
    const payloadLength = bodyLength - extra;
    if (payloadLength < 0) {
      throw new EnvelopeError('REPOSITORY_CORRUPT', 'truncated', `truncated: body of ${bodyLength} bytes`);
    }
    const zstd = (flags & FLAG_ZSTD) !== 0;
    if (zstd ? payloadLength >= plainLength : payloadLength !== plainLength) {
      throw corrupt(`payload of ${payloadLength} bytes does not fit ${plainLength} bytes of data`);
    }
    let payload: Buffer;
    if (encrypted) {
      const nonce = buf.subarray(HEADER_SIZE, HEADER_SIZE + NONCE_SIZE);
      const body = buf.subarray(HEADER_SIZE + NONCE_SIZE, HEADER_SIZE + NONCE_SIZE + payloadLength);
      const tag = buf.subarray(HEADER_SIZE + NONCE_SIZE + payloadLength);
      const decipher = createDecipheriv('aes-256-gcm', this.key!, nonce, { authTagLength: TAG_SIZE });
      decipher.setAAD(additionalData(buf, name));
      decipher.setAuthTag(tag);
      try {
        payload = Buffer.concat([decipher.update(body), decipher.final()]);
      } catch {
        throw corrupt('authentication failed: the object is damaged or was not written under this name and key');
      }
    } else {
      payload = buf.subarray(HEADER_SIZE, HEADER_SIZE + payloadLength);
      if ((flags & FLAG_CHECKSUM) !== 0) {
        const end = HEADER_SIZE + payloadLength;
        const want = buf.subarray(end, end + CHECKSUM_SIZE);
        const got = createHash('sha256').update(buf.subarray(0, end)).digest();
        if (!got.equals(want)) throw corrupt('checksum mismatch');
        // Checked after the checksum: damage reads as damage, a forgery (a good checksum, no key) as a bad MAC.
        if (hasMac && this.macKey !== null) {
          const mac = manifestMac(this.macKey, buf.subarray(0, end + CHECKSUM_SIZE), name);
          if (!timingSafeEqual(mac, buf.subarray(end + CHECKSUM_SIZE))) {
            throw corrupt(
              "its MAC does not match the repository's integrity key: forged, or written under another key",
            );
          }
        }
      }
    }
    // A stored plaintext is copied out unless the caller may have a view of `stored` (the worker, whose input
    // buffer then travels back as the result).
    if (!zstd) return encrypted || allowView ? payload : Buffer.from(payload);
    this.dctx ??= new this.zstd.DCtx();
    const out = Buffer.allocUnsafe(plainLength);
    let n: number;
    try {
      n = this.dctx.decompress(out, payload);
    } catch (err) {
      throw corrupt(`zstd: ${(err as Error).message}`);
    }
    if (n !== plainLength) throw corrupt(`decompressed to ${n} bytes, the header says ${plainLength}`);
    return out;
  }
}

/**
 * Checks that an opened object's plaintext is what its name says: SHA-256, or HMAC-SHA-256 under `idKey` in an
 * encrypted repository, equal to `expectId` (hex). Done where the object was opened (a worker, for chunks), so
 * that a restore's main thread does not hash every byte it restores.
 */
export function checkContentId(plain: Uint8Array, expectId: string, idKey: Uint8Array | null): void {
  const got = (idKey ? createHmac('sha256', idKey) : createHash('sha256')).update(plain).digest('hex');
  if (got !== expectId) throw corrupt('its content does not hash to its name');
}

/** The MAC of a manifest envelope: over everything before it and the object's name (so it cannot be moved). */
function manifestMac(key: Buffer, sealed: Uint8Array, name: string): Buffer {
  return createHmac('sha256', key).update(sealed).update(Buffer.from(name, 'utf8')).digest();
}

function additionalData(header: Buffer, name: string): Buffer {
  return Buffer.concat([header.subarray(0, HEADER_SIZE), Buffer.from(name, 'utf8')]);
}

// -------------------------------------------------------------------------------------------------
// Worker side of pool.ts: one codec per thread, one message per task, results transferred back.

export interface WorkerSetup {
  tidemarkEnvelopeWorker: true;
  zstdPath: string;
  key: Uint8Array | null;
  /** the chunk-id HMAC key (null: plain SHA-256 names) */
  idKey: Uint8Array | null;
  /** the manifest MAC key (unencrypted repositories with an integrity key) */
  macKey: Uint8Array | null;
  level: number;
}

/** `out`: a spare buffer for a seal's result (main keeps a few, so neither side allocates per chunk). */
export type WorkerTask =
  | { seq: number; op: 'seal'; data: Uint8Array; opts: SealOptions; out?: ArrayBuffer }
  | { seq: number; op: 'open'; data: Uint8Array; type: ObjectType; name: string; maxPlain: number; expectId?: string };

/** `spares`: buffers the worker is done with (the task's input, an unused `out`), moved back to main. */
export type WorkerReply = { seq: number; spares: ArrayBuffer[] } & (
  | { ok: true; data: Uint8Array }
  | { ok: false; error: { code: string; problem: string; message: string; envelope: boolean } }
);

function serveWorker(setup: WorkerSetup): void {
  const zstd = createRequire(setup.zstdPath)(setup.zstdPath) as ZstdBinding;
  const codec = new EnvelopeCodec(
    zstd,
    setup.key ? Buffer.from(setup.key) : null,
    setup.level,
    setup.macKey ? Buffer.from(setup.macKey) : null,
  );
  const idKey = setup.idKey ? Buffer.from(setup.idKey) : null;
  parentPort!.on('message', (task: WorkerTask) => {
    let reply: WorkerReply;
    const spareOut = task.op === 'seal' ? task.out : undefined;
    try {
      const out =
        task.op === 'seal'
          ? codec.seal(task.data, task.opts, spareOut)
          : codec.open(task.data, task.type, task.name, task.maxPlain, true);
      if (task.op === 'open' && task.expectId !== undefined) checkContentId(out, task.expectId, idKey);
      // The input is done with, unless the result is a view of it; so is an unused out.
      const spares = out.buffer === task.data.buffer ? [] : [task.data.buffer as ArrayBuffer];
      if (spareOut && out.buffer !== spareOut) spares.push(spareOut);
      reply = { seq: task.seq, spares, ok: true, data: out };
    } catch (err) {
      const e = err as EnvelopeError;
      reply = {
        seq: task.seq,
        spares: [task.data.buffer as ArrayBuffer, ...(spareOut ? [spareOut] : [])],
        ok: false,
        error: {
          code: e.code ?? 'INTERNAL',
          problem: e.problem ?? 'corrupt',
          message: e.message,
          envelope: e instanceof EnvelopeError,
        },
      };
    }
    // A buffer that owns its whole ArrayBuffer can move instead of being copied (pooled small ones cannot).
    // A result in the spare `out`, or one owning its whole ArrayBuffer, moves instead of being copied (small
    // ones carved from Node's shared pool cannot).
    const transfer: ArrayBuffer[] = [...reply.spares];
    if (reply.ok) {
      const b = reply.data;
      const own =
        b.buffer === spareOut ||
        b.buffer === task.data.buffer ||
        (b.byteOffset === 0 && b.byteLength === b.buffer.byteLength);
      if (own && !transfer.includes(b.buffer as ArrayBuffer)) transfer.push(b.buffer as ArrayBuffer);
    }
    parentPort!.postMessage(reply, transfer);
  });
}

if (!isMainThread && (workerData as Partial<WorkerSetup> | null)?.tidemarkEnvelopeWorker === true) {
  serveWorker(workerData as WorkerSetup);
}
