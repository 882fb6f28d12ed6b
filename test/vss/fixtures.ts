/**
 * Writers and providers for the VSS tests: a scripted writer and a scripted provider whose every phase can
 * succeed, fail (fatally or not), throw, hang or be slow; an application writer doing real I/O on a real
 * file; and a trivial storage-snapshot provider that copies files at commit.
 */
import { copyFile, mkdir, readdir, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { TidemarkError } from '../../src/errors.js';
import type {
  PreparedSnapshot,
  SnapshotOptions,
  SnapshotProvider,
  StorageSnapshot,
} from '../../src/snapshot/provider.js';
import { systemClock, type Clock } from '../../src/util/clock.js';
import { NodeFile, type RandomAccessFile } from '../../src/util/file.js';
import type {
  CommittedSnapshot,
  ComponentMetadata,
  IdentifyContext,
  Provider,
  ProviderContext,
  VolumeRequest,
  Writer,
  WriterContext,
  WriterFailureKind,
  WriterMetadata,
  WriterPhase,
} from '../../src/vss/index.js';
import { sleep } from '../helpers/async.js';

/** A shared, ordered record of who was called with what: `writer:A.freeze`, `provider:P.commit`, `host.hold`. */
export type Journal = string[];

// ---------------------------------------------------------------------------------------------------
// Scripted writer

export type Behaviour =
  | 'ok'
  | 'throw'
  | 'hang'
  | 'false' // returns false without setting a failure
  | 'not-boolean'
  | { fail: WriterFailureKind; fatal: boolean }
  | { delayMs: number }
  | { components: { name: string; logicalPath?: string; kind: WriterFailureKind }[]; fatal?: boolean };

export interface ScriptedWriterOptions {
  name: string;
  components?: ComponentMetadata[];
  script?: Partial<Record<WriterPhase, Behaviour | Behaviour[]>>;
  journal?: Journal;
  freezeWindowMs?: number;
  /** What a `{ delayMs }` waits on (default: the system clock). */
  clock?: Clock;
}

export const defaultComponents = (name: string): ComponentMetadata[] => [
  { name: 'data', logicalPath: name, selectable: true, caption: `${name} data`, fileSets: [] },
  { name: 'logs', logicalPath: name, selectable: true, fileSets: [] },
  { name: 'config', logicalPath: name, selectable: false, fileSets: [], data: `{"writer":"${name}"}` },
];

/**
 * Does what its script says in each phase (a list: one entry per call, the last one repeating). Tracks
 * whether it is frozen, and every context it received.
 */
export class ScriptedWriter implements Writer {
  readonly name: string;
  readonly freezeWindowMs?: number;
  frozen = false;
  readonly contexts: WriterContext[] = [];
  private readonly calls = new Map<WriterPhase, number>();

  constructor(private readonly opts: ScriptedWriterOptions) {
    this.name = opts.name;
    if (opts.freezeWindowMs !== undefined) this.freezeWindowMs = opts.freezeWindowMs;
  }

  count(phase: WriterPhase): number {
    return this.calls.get(phase) ?? 0;
  }

  private behaviour(phase: WriterPhase): Behaviour {
    const n = this.count(phase);
    this.calls.set(phase, n + 1);
    const s = this.opts.script?.[phase] ?? 'ok';
    return Array.isArray(s) ? s[Math.min(n, s.length - 1)] : s;
  }

  private async act(
    phase: WriterPhase,
    ctx: Pick<WriterContext, 'setFailure'> & Partial<WriterContext>,
  ): Promise<boolean> {
    this.opts.journal?.push(`writer:${this.name}.${phase}`);
    const b = this.behaviour(phase);
    if (b === 'ok') return true;
    if (b === 'throw') throw new Error(`${this.name} exploded in ${phase}`);
    if (b === 'hang') return new Promise<boolean>(() => undefined);
    if (b === 'false') return false;
    if (b === 'not-boolean') return 'yes' as unknown as boolean;
    if ('delayMs' in b) {
      await (this.opts.clock ?? systemClock).sleep(b.delayMs);
      return true;
    }
    if ('fail' in b) {
      ctx.setFailure(b.fail, `${this.name} says ${b.fail} in ${phase}`);
      return !b.fatal;
    }
    for (const c of b.components)
      ctx.setComponentFailure!(c, c.kind, `${this.name}: component ${c.name} failed in ${phase}`);
    return !b.fatal;
  }

  async identify(ctx: IdentifyContext): Promise<WriterMetadata | false> {
    const r = await this.act('identify', ctx);
    if (r === false) return false;
    if (r !== true) return r as unknown as WriterMetadata; // a writer returning garbage
    return { components: this.opts.components ?? defaultComponents(this.name) };
  }
  async prepareForBackup(ctx: WriterContext) {
    this.contexts.push(ctx);
    return this.act('prepareForBackup', ctx);
  }
  async prepareForSnapshot(ctx: WriterContext) {
    this.contexts.push(ctx);
    return this.act('prepareForSnapshot', ctx);
  }
  async freeze(ctx: WriterContext) {
    this.contexts.push(ctx);
    this.frozen = true;
    return this.act('freeze', ctx);
  }
  async thaw(ctx: WriterContext) {
    this.contexts.push(ctx);
    const r = await this.act('thaw', ctx);
    this.frozen = false;
    return r;
  }
  async postSnapshot(ctx: WriterContext) {
    this.contexts.push(ctx);
    return this.act('postSnapshot', ctx);
  }
  async backupComplete(ctx: WriterContext) {
    this.contexts.push(ctx);
    return this.act('backupComplete', ctx);
  }
  async abort(ctx: WriterContext) {
    this.contexts.push(ctx);
    this.frozen = false;
    return this.act('abort', ctx);
  }
}

// ---------------------------------------------------------------------------------------------------
// Scripted provider

export type ProviderBehaviour = 'ok' | 'throw' | 'veto' | 'hang' | { delayMs: number };
type ScriptedPhase = 'isSupported' | 'beginPrepare' | 'endPrepare' | 'preCommit' | 'commit' | 'postCommit' | 'abort';

/**
 * A provider that does nothing real but keeps count of what it holds (one unit per prepared volume, one per
 * committed snapshot) so tests can check that abort releases everything.
 */
export class ScriptedProvider implements Provider {
  readonly sets = new Map<string, { volumes: VolumeRequest[]; committed: boolean }>();
  readonly calls: string[] = [];

  constructor(
    readonly name: string,
    private readonly script: Partial<Record<ScriptedPhase, ProviderBehaviour>> = {},
    private readonly journal?: Journal,
    /** What a `{ delayMs }` waits on. */
    private readonly clock: Clock = systemClock,
  ) {}

  /** Units held across every set: 0 once everything was aborted or deleted. */
  held(): number {
    let n = 0;
    for (const s of this.sets.values()) n += s.volumes.length * (s.committed ? 2 : 1);
    return n;
  }

  private async act(phase: ScriptedPhase): Promise<void> {
    this.calls.push(phase);
    this.journal?.push(`provider:${this.name}.${phase}`);
    const b = this.script[phase] ?? 'ok';
    if (b === 'ok') return;
    if (b === 'throw') throw new Error(`${this.name} broke in ${phase}`);
    if (b === 'veto') throw new TidemarkError('IO_ERROR', `${this.name} refused ${phase}`);
    if (b === 'hang') return new Promise<void>(() => undefined);
    await this.clock.sleep(b.delayMs);
  }

  async isSupported(files: readonly string[]): Promise<string | undefined> {
    await this.act('isSupported');
    return files.some((f) => f.includes('unsupported')) ? `${this.name} cannot snapshot that` : undefined;
  }
  async beginPrepare(ctx: ProviderContext, volume: VolumeRequest) {
    const set = this.sets.get(ctx.snapshotSetId) ?? { volumes: [], committed: false };
    set.volumes.push(volume);
    this.sets.set(ctx.snapshotSetId, set);
    await this.act('beginPrepare');
  }
  async endPrepare() {
    await this.act('endPrepare');
  }
  async preCommit() {
    await this.act('preCommit');
  }
  async commit(ctx: ProviderContext) {
    await this.act('commit');
    const set = this.sets.get(ctx.snapshotSetId);
    if (set) set.committed = true;
  }
  async postCommit(ctx: ProviderContext): Promise<CommittedSnapshot[]> {
    await this.act('postCommit');
    const set = this.sets.get(ctx.snapshotSetId)!;
    return set.volumes.map((v) => ({ snapshotId: v.snapshotId, files: v.files, createdAt: new Date(), handle: v }));
  }
  async abort(ctx: ProviderContext) {
    this.sets.delete(ctx.snapshotSetId);
    await this.act('abort');
  }
  async deleteSnapshots(ctx: ProviderContext) {
    this.calls.push('deleteSnapshots');
    this.journal?.push(`provider:${this.name}.deleteSnapshots`);
    this.sets.delete(ctx.snapshotSetId);
  }
}

// ---------------------------------------------------------------------------------------------------
// A trivial storage-snapshot provider: commit copies the files (fine for small test files)

class CopyView implements RandomAccessFile {
  readonly writable = false;
  constructor(
    readonly path: string,
    private readonly file: NodeFile,
    private readonly isReleased: () => boolean,
  ) {}
  private check(): void {
    if (this.isReleased()) throw new TidemarkError('CLOSED', `the snapshot of ${this.path} was released`);
  }
  size(): number {
    return this.file.size();
  }
  async read(buf: Uint8Array, position: number): Promise<void> {
    this.check();
    await this.file.read(buf, position);
  }
  async write(): Promise<void> {
    throw new TidemarkError('READ_ONLY', `${this.path} is a snapshot view`);
  }
  async truncate(): Promise<void> {
    throw new TidemarkError('READ_ONLY', `${this.path} is a snapshot view`);
  }
  async datasync(): Promise<void> {}
  async close(): Promise<void> {
    await this.file.close();
  }
}

let copySeq = 0;

export class CopySnapshotProvider implements SnapshotProvider {
  readonly name = 'copy';
  commitDelayMs = 0;

  async supports(files: string[], opts: SnapshotOptions): Promise<string | undefined> {
    if (!opts.diffAreaRoot) return 'no diffAreaRoot';
    for (const f of files) {
      const st = await stat(f).catch(() => undefined);
      if (!st?.isFile()) return `${f} is not a regular file`;
    }
    return undefined;
  }

  async prepare(files: string[], opts: SnapshotOptions): Promise<PreparedSnapshot> {
    const id = `copy-${process.pid}-${++copySeq}`;
    const dir = path.join(opts.diffAreaRoot, id);
    await mkdir(dir, { recursive: true });
    let state: 'prepared' | 'committed' | 'aborted' = 'prepared';
    const abs = files.map((f) => path.resolve(f));
    const delay = () => this.commitDelayMs;
    return {
      async commit(): Promise<StorageSnapshot> {
        if (state !== 'prepared') throw new TidemarkError('CLOSED', `snapshot ${id} is ${state}`);
        if (delay() > 0) await sleep(delay());
        await Promise.all(abs.map((f, i) => copyFile(f, path.join(dir, `${i}.copy`))));
        state = 'committed';
        let released = false;
        const views: RandomAccessFile[] = [];
        return {
          id,
          provider: 'copy',
          createdAt: new Date(),
          files: abs,
          async openFile(p: string) {
            if (released) throw new TidemarkError('CLOSED', `snapshot ${id} was released`);
            const i = abs.indexOf(path.resolve(p));
            if (i < 0) throw new TidemarkError('NOT_FOUND', `${p} is not in snapshot ${id}`);
            const v = new CopyView(abs[i], await NodeFile.open(path.join(dir, `${i}.copy`), 'r'), () => released);
            views.push(v);
            return v;
          },
          stats: () => ({ diffAreaBytes: 0, preservedExtents: 0 }),
          async release() {
            if (released) return;
            released = true;
            await Promise.all(views.map((v) => v.close().catch(() => undefined)));
            await rm(dir, { recursive: true, force: true });
          },
        };
      },
      async abort() {
        if (state === 'aborted') return;
        state = 'aborted';
        await rm(dir, { recursive: true, force: true });
      },
    };
  }

  async recover(opts: SnapshotOptions): Promise<number> {
    const names = (await readdir(opts.diffAreaRoot).catch(() => [] as string[])).filter((n) => n.startsWith('copy-'));
    await Promise.all(names.map((n) => rm(path.join(opts.diffAreaRoot, n), { recursive: true, force: true })));
    return names.length;
  }
}

/** Entries left under a diff-area root: 0 once every snapshot was released or aborted. */
export async function entriesUnder(dir: string): Promise<number> {
  return (await readdir(dir).catch(() => [] as string[])).length;
}

// ---------------------------------------------------------------------------------------------------
// An application writer doing real I/O

const RECORD = 4096;

/**
 * A small "database": a loop appends fixed-size records to `<dir>/app.db`, each written in two halves (so an
 * unfrozen snapshot can catch a torn record), and a line per record to `<dir>/app.log`. Freeze waits for the
 * record in flight and flushes; Thaw and Abort resume. BackupComplete of a full or log backup truncates the
 * log, as a database does after its logs are safely backed up.
 */
export class AppWriter implements Writer {
  readonly name: string;
  readonly db: string;
  readonly log: string;
  records = 0;
  logTruncations = 0;
  frozen = false;
  recordsAtFreeze = -1;
  private db_?: NodeFile;
  private log_?: NodeFile;
  private logSize = 0;
  private running = false;
  private loop?: Promise<void>;
  private gate: Promise<void> = Promise.resolve();
  private open_ = () => {};
  private writeError: unknown;

  constructor(
    readonly dir: string,
    name = 'app',
  ) {
    this.name = name;
    this.db = path.join(dir, `${name}.db`);
    this.log = path.join(dir, `${name}.log`);
  }

  async start(): Promise<void> {
    this.db_ = await NodeFile.open(this.db, 'w');
    this.log_ = await NodeFile.open(this.log, 'w');
    this.running = true;
    this.loop = this.run();
  }

  async stop(): Promise<void> {
    this.running = false;
    this.open_();
    await this.loop;
    await this.db_?.close();
    await this.log_?.close();
    if (this.writeError) throw this.writeError;
  }

  private async run(): Promise<void> {
    try {
      while (this.running) {
        const g = this.gate;
        await g;
        // A pause that closed a new gate while we were waking up wins: no record starts after it.
        if (this.gate !== g || !this.running) continue;
        this.current = this.writeRecord();
        await this.current;
        this.current = undefined;
        await sleep(1);
      }
    } catch (err) {
      this.writeError = err;
    }
  }

  private async writeRecord(): Promise<void> {
    const n = this.records;
    const rec = Buffer.alloc(RECORD, n & 0xff);
    rec.writeUInt32LE(n, 0);
    rec.writeUInt32LE(n, RECORD - 4);
    await this.db_!.write(rec.subarray(0, RECORD / 2), n * RECORD);
    await new Promise((r) => setImmediate(r)); // the torn-record window an unfrozen snapshot would see
    await this.db_!.write(rec.subarray(RECORD / 2), n * RECORD + RECORD / 2);
    const line = Buffer.from(`record ${n}\n`);
    await this.log_!.write(line, this.logSize);
    this.logSize += line.length;
    this.records = n + 1;
  }

  private current?: Promise<void>;

  /** Stops the loop at a record boundary and flushes. */
  private async pause(): Promise<void> {
    if (this.frozen) return;
    this.frozen = true;
    this.gate = new Promise((r) => (this.open_ = r));
    await this.current;
    await this.db_!.datasync();
    await this.log_!.datasync();
    this.recordsAtFreeze = this.records;
  }

  private resume(): void {
    this.frozen = false;
    this.open_();
  }

  async identify(): Promise<WriterMetadata> {
    return {
      components: [
        {
          name: 'database',
          logicalPath: '',
          selectable: false,
          caption: 'the records',
          fileSets: [{ path: this.dir, filespec: `${this.name}.db`, recursive: false }],
        },
        {
          name: 'log',
          logicalPath: 'logs',
          selectable: true,
          fileSets: [{ path: this.dir, filespec: `${this.name}.log`, recursive: false }],
        },
      ],
    };
  }
  async prepareForBackup(): Promise<boolean> {
    return true;
  }
  async prepareForSnapshot(ctx: WriterContext): Promise<boolean> {
    if (!ctx.snapshotSetFiles.includes(this.db)) {
      ctx.setFailure('INCONSISTENTSNAPSHOT', `${this.db} is not in the snapshot set`);
      return false;
    }
    return true;
  }
  async freeze(ctx: WriterContext): Promise<boolean> {
    try {
      await this.pause();
      return true;
    } catch (err) {
      ctx.setFailure('RETRYABLE', `could not flush: ${(err as Error).message}`);
      this.resume();
      return false;
    }
  }
  async thaw(): Promise<boolean> {
    this.resume();
    return true;
  }
  async postSnapshot(): Promise<boolean> {
    return true;
  }
  async backupComplete(ctx: WriterContext): Promise<boolean> {
    const log = ctx.components.find((c) => c.name === 'log');
    if ((ctx.backupType === 'full' || ctx.backupType === 'log') && log?.backupSucceeded) {
      // Truncation waits for a record boundary, like the freeze.
      await this.pause();
      await this.log_!.truncate(0);
      this.logSize = 0;
      this.logTruncations++;
      this.resume();
    }
    return true;
  }
  async abort(): Promise<boolean> {
    this.resume();
    return true;
  }
}

/** Reads a snapshot of AppWriter's database: the number of records and whether any is torn. */
export async function checkAppDb(file: RandomAccessFile): Promise<{ records: number; torn: number[] }> {
  const size = file.size();
  const torn: number[] = [];
  const buf = Buffer.alloc(RECORD);
  const n = Math.ceil(size / RECORD);
  for (let i = 0; i < n; i++) {
    await file.read(buf, i * RECORD);
    const a = buf.readUInt32LE(0);
    const b = buf.readUInt32LE(RECORD - 4);
    if (a !== i || b !== i || size < (i + 1) * RECORD) torn.push(i);
  }
  return { records: n - torn.length, torn };
}
