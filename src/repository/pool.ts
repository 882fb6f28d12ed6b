/**
 * Compression and encryption off the main thread. zstd-napi's calls are synchronous, so a backup that compresses
 * on the main thread spends most of its time there (about 7 ms per MiB at level 3): a few worker threads, each
 * with its own EnvelopeCodec, let the main thread read, hash and write while chunks are being sealed. With
 * `workers: 0` everything runs inline (same results; used for small jobs and as the measured baseline).
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { TidemarkError, type ErrorCode, TidemarkErrorBase } from '../errors.js';
import {
  checkContentId,
  EnvelopeCodec,
  EnvelopeError,
  MAX_OVERHEAD,
  type ObjectType,
  type SealOptions,
  type WorkerReply,
  type WorkerSetup,
  type WorkerTask,
  type ZstdBinding,
} from './envelope.js';

const require = createRequire(import.meta.url);
const ZSTD_PATH = require.resolve('zstd-napi/binding.js');

let zstdBinding: ZstdBinding | undefined;
/** The native zstd binding (zstd-napi, built from source by node-gyp at install when no prebuilt one fits). */
export function loadZstd(): ZstdBinding {
  if (!zstdBinding) {
    try {
      zstdBinding = require(ZSTD_PATH) as ZstdBinding;
    } catch (err) {
      throw new TidemarkError(
        'NOT_SUPPORTED',
        `the zstd native binding cannot be loaded (${(err as Error).message.split('\n')[0]}): run \`npm rebuild zstd-napi\` (needs g++, make, python3)`,
        {},
        { cause: err },
      );
    }
  }
  return zstdBinding;
}

/** What failed in a codec call: the envelope's problem, to be wrapped with the object's key by the caller. */
export class CodecError extends TidemarkErrorBase {
  constructor(
    code: ErrorCode,
    readonly problem: 'truncated' | 'corrupt',
    message: string,
  ) {
    super(code, message);
    this.name = 'CodecError';
  }
}

export interface Codec {
  seal(plain: Uint8Array, opts: SealOptions): Promise<Buffer>;
  /** Hands back a buffer `seal` returned once nothing uses it any more, to be reused (others are ignored). */
  recycle(buf: Uint8Array): void;
  /** Transfer buffers allocated so far because no spare fitted (a measure of reuse). */
  readonly buffersAllocated: number;
  /** Opens an object; with `expectId`, also checks that the plaintext hashes to it (else a corrupt CodecError). */
  open(stored: Uint8Array, type: ObjectType, name: string, maxPlain: number, expectId?: string): Promise<Buffer>;
  close(): Promise<void>;
  readonly workers: number;
}

export interface CodecOptions {
  key: Buffer | null;
  /** the key chunk ids are HMACs under (null or absent: SHA-256 ids) */
  idKey?: Buffer | null;
  /** the manifest MAC key of an unencrypted repository with an integrity key (envelope.ts) */
  macKey?: Buffer | null;
  /** zstd level (default 3) */
  level?: number;
  /** worker threads; 0 = inline; default: one per core, at most 4 */
  workers?: number;
}

export function defaultWorkers(): number {
  return Math.max(1, Math.min(4, os.availableParallelism()));
}

export async function createCodec(opts: CodecOptions): Promise<Codec> {
  const level = opts.level ?? 3;
  const workers = opts.workers ?? defaultWorkers();
  // Loaded here too when workers do the work: a missing binding fails now, with a message, not in a thread.
  const zstd = loadZstd();
  const macKey = opts.macKey ?? null;
  if (workers <= 0) return new InlineCodec(new EnvelopeCodec(zstd, opts.key, level, macKey), opts.idKey ?? null);
  return new PoolCodec(
    workerScript(),
    { tidemarkEnvelopeWorker: true, zstdPath: ZSTD_PATH, key: opts.key, idKey: opts.idKey ?? null, macKey, level },
    workers,
  );
}

function wrap(err: unknown): never {
  if (err instanceof EnvelopeError) throw new CodecError(err.code, err.problem, err.message);
  throw err;
}

class InlineCodec implements Codec {
  readonly workers = 0;
  constructor(
    private readonly codec: EnvelopeCodec,
    private readonly idKey: Buffer | null,
  ) {}
  async seal(plain: Uint8Array, opts: SealOptions): Promise<Buffer> {
    return this.codec.seal(plain, opts);
  }
  recycle(): void {}
  readonly buffersAllocated = 0;
  async open(stored: Uint8Array, type: ObjectType, name: string, maxPlain: number, expectId?: string): Promise<Buffer> {
    try {
      const plain = this.codec.open(stored, type, name, maxPlain);
      if (expectId !== undefined) checkContentId(plain, expectId, this.idKey);
      return plain;
    } catch (err) {
      wrap(err);
    }
  }
  async close(): Promise<void> {}
}

/**
 * The worker entry: envelope.js, compiled beside this module. Run from the TypeScript sources (vitest), this module
 * is src/repository/pool.ts and has no compiled neighbour: the build's copy at the repository root serves
 * (dist/repository/envelope.js; `npm test` builds first). Either way the workers run compiled code.
 */
export function workerEntry(moduleUrl: string = import.meta.url): URL {
  return moduleUrl.endsWith('.ts')
    ? new URL('../../dist/repository/envelope.js', moduleUrl)
    : new URL('./envelope.js', moduleUrl);
}

/** The worker entry, checked once: a missing build fails with a message, not with a worker's exit. */
function workerScript(): URL {
  const url = workerEntry();
  if (!existsSync(fileURLToPath(url))) {
    throw new TidemarkError(
      'NOT_SUPPORTED',
      `the codec worker ${fileURLToPath(url)} does not exist: build Tidemark first (\`npm run build\`)`,
    );
  }
  return url;
}

interface Pending {
  resolve: (b: Buffer) => void;
  reject: (e: unknown) => void;
}

interface Slot {
  worker: Worker;
  inFlight: number;
  pending: Map<number, Pending>;
}

/** Two tasks in flight per worker hide the message round trip; the rest wait in a queue. */
const PER_WORKER = 2;
/** Spare buffers are allocated in steps of this much, so one serves as a chunk's input and as its output. */
const SPARE_STEP = 64 * 1024;
/**
 * Buffers handed back by the workers (inputs they are done with) and by callers (results they are done with),
 * reused for the next tasks' inputs and results: a backup then allocates no memory per chunk, which spared
 * V8 a mark-compact every few dozen chunks (external memory pressure).
 */
const MAX_SPARES = 32;

class PoolCodec implements Codec {
  private slots: Slot[] = [];
  private queue: { task: WorkerTask; pending: Pending }[] = [];
  private seq = 0;
  private closed = false;
  private failure: Error | null = null;
  private spares: ArrayBuffer[] = [];
  buffersAllocated = 0;
  /** Result buffers given to callers, which may come back through recycle(). */
  private readonly issued = new WeakSet<ArrayBufferLike>();

  constructor(
    script: URL,
    setup: WorkerSetup,
    readonly workers: number,
  ) {
    for (let i = 0; i < workers; i++) {
      const worker = new Worker(script, { workerData: setup });
      const slot: Slot = { worker, inFlight: 0, pending: new Map() };
      worker.on('message', (reply: WorkerReply) => this.settle(slot, reply));
      worker.on('error', (err) => this.fail(err));
      worker.on('exit', (code) => {
        if (!this.closed) this.fail(new Error(`codec worker exited (${code})`));
      });
      // An idle pool must not keep the process alive; a busy worker is ref'd again in dispatch().
      worker.unref();
      this.slots.push(slot);
    }
  }

  seal(plain: Uint8Array, opts: SealOptions): Promise<Buffer> {
    return this.submit({ seq: ++this.seq, op: 'seal', data: plain, opts });
  }

  open(stored: Uint8Array, type: ObjectType, name: string, maxPlain: number, expectId?: string): Promise<Buffer> {
    return this.submit({ seq: ++this.seq, op: 'open', data: stored, type, name, maxPlain, expectId });
  }

  recycle(buf: Uint8Array): void {
    if (!this.issued.has(buf.buffer)) return;
    this.issued.delete(buf.buffer);
    this.keepSpare(buf.buffer as ArrayBuffer);
  }

  private keepSpare(ab: ArrayBuffer): void {
    if (this.spares.length < MAX_SPARES && ab.byteLength >= SPARE_STEP) this.spares.push(ab); // a detached one has length 0
  }

  /** A spare of at least `bytes` (a new one when none fits). */
  private takeSpare(bytes: number): ArrayBuffer {
    const i = this.spares.findIndex((b) => b.byteLength >= bytes);
    if (i >= 0) return this.spares.splice(i, 1)[0];
    this.buffersAllocated++;
    return new ArrayBuffer(Math.ceil(bytes / SPARE_STEP) * SPARE_STEP);
  }

  private submit(task: WorkerTask): Promise<Buffer> {
    if (this.closed) return Promise.reject(new TidemarkError('CLOSED', 'the repository is closed'));
    if (this.failure) return Promise.reject(this.failure);
    return new Promise<Buffer>((resolve, reject) => {
      this.queue.push({ task, pending: { resolve, reject } });
      this.dispatch();
    });
  }

  private dispatch(): void {
    while (this.queue.length > 0) {
      let best: Slot | undefined;
      for (const s of this.slots) if (s.inFlight < PER_WORKER && (!best || s.inFlight < best.inFlight)) best = s;
      if (!best) return;
      const { task, pending } = this.queue.shift()!;
      best.pending.set(task.seq, pending);
      if (best.inFlight++ === 0) best.worker.ref();
      // A view would be cloned with its whole underlying ArrayBuffer (a slice of a 256 MiB image copies all of
      // it): copy just the bytes into a spare and move that. A seal also gets a spare for its result.
      const n = task.data.byteLength;
      const input = this.takeSpare(Math.max(n, 1));
      const data = new Uint8Array(input, 0, n);
      data.set(task.data);
      const transfer = [input];
      let out: ArrayBuffer | undefined;
      if (task.op === 'seal') transfer.push((out = this.takeSpare(n + MAX_OVERHEAD)));
      best.worker.postMessage({ ...task, data, ...(out ? { out } : {}) }, transfer);
    }
  }

  private settle(slot: Slot, reply: WorkerReply): void {
    const pending = slot.pending.get(reply.seq);
    if (!pending) return;
    slot.pending.delete(reply.seq);
    if (--slot.inFlight === 0) slot.worker.unref();
    for (const ab of reply.spares) this.keepSpare(ab);
    if (reply.ok) {
      this.issued.add(reply.data.buffer);
      pending.resolve(Buffer.from(reply.data.buffer, reply.data.byteOffset, reply.data.byteLength));
    } else if (reply.error.envelope) {
      pending.reject(
        new CodecError(reply.error.code as ErrorCode, reply.error.problem as 'corrupt', reply.error.message),
      );
    } else {
      pending.reject(new Error(`codec worker: ${reply.error.message}`));
    }
    this.dispatch();
  }

  private fail(err: Error): void {
    this.failure ??= err;
    for (const s of this.slots) {
      for (const p of s.pending.values()) p.reject(err);
      s.pending.clear();
      s.inFlight = 0;
    }
    for (const q of this.queue.splice(0)) q.pending.reject(err);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.fail(new TidemarkError('CLOSED', 'the repository was closed during the operation'));
    await Promise.all(this.slots.map((s) => s.worker.terminate()));
  }
}
