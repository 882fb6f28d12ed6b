/**
 * The one conformance suite every VSS writer and every VSS provider runs (the unstorage `testDriver`
 * pattern). `writerConformance(name, makeWriter)` and `providerConformance(name, setup)` declare vitest
 * blocks; a test file calls them once per implementation.
 */
import { randomUUID } from 'node:crypto';
import { mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { NodeFile } from '../../src/util/file.js';
import {
  BACKUP_TYPES,
  BackupComponents,
  ManagedProvider,
  ManagedWriter,
  componentPath,
  snapshotProviderAdapter,
  validateWriterMetadata,
  type Provider,
  type ProviderContext,
  type SelectedComponent,
  type VssLimits,
  type Writer,
  type WriterCallInput,
  type WriterContext,
  type WriterMetadata,
  type WriterPhase,
} from '../../src/vss/index.js';
import { tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import { CopySnapshotProvider, ScriptedProvider, entriesUnder } from './fixtures.js';

/** Short limits so that a test that goes wrong fails fast. */
export const TEST_LIMITS: Partial<VssLimits> = {
  freezeWindowMs: 5_000,
  holdWritesMs: 3_000,
  commitWarnMs: 1_000,
  commitLimitMs: 3_000,
  writerCallbackMs: 5_000,
  providerCallMs: 5_000,
};

function selectedFrom(meta: WriterMetadata): SelectedComponent[] {
  return meta.components.map((c) => ({
    logicalPath: c.logicalPath ?? '',
    name: c.name,
    selectable: c.selectable,
    implicit: true,
    fileSets: c.fileSets,
    ...(c.data !== undefined ? { data: c.data } : {}),
  }));
}

/** A context as the framework builds it, for calling a writer directly; records what the writer set. */
function rawContext(phase: WriterPhase, components: SelectedComponent[], files: string[]) {
  const failures: string[] = [];
  const ctx: WriterContext = {
    phase,
    backupType: 'full',
    snapshotSetId: randomUUID(),
    components,
    snapshotSetFiles: files,
    snapshots: [],
    signal: new AbortController().signal,
    setFailure: (kind, message) => failures.push(`${kind}: ${message}`),
    setComponentFailure: (c, kind, message) =>
      failures.push(`${componentPath(c.logicalPath, c.name)} ${kind}: ${message}`),
  };
  return { ctx, failures };
}

const SEQUENCE: Exclude<WriterPhase, 'identify' | 'abort'>[] = [
  'prepareForBackup',
  'prepareForSnapshot',
  'freeze',
  'thaw',
  'postSnapshot',
  'backupComplete',
];
const STATES_AFTER = [
  'STABLE',
  'WAITING_FOR_FREEZE',
  'WAITING_FOR_THAW',
  'WAITING_FOR_POST_SNAPSHOT',
  'WAITING_FOR_BACKUP_COMPLETE',
  'STABLE',
];

export interface WriterConformanceOptions {
  /** The files holding the writer's data, for the snapshot set (default: one scratch file). */
  files?: () => string[] | Promise<string[]>;
  /** Called after the suite (e.g. to stop the application). */
  teardown?: () => Promise<void>;
}

/**
 * Checks a well-behaved writer: Identify returns valid metadata; callbacks return booleans and never throw;
 * states follow the sequence; Abort at any point is accepted, idempotent, and leaves it ready for the next
 * backup; a backup through BackupComponents succeeds for every backup type.
 */
export function writerConformance(
  name: string,
  makeWriter: () => Writer | Promise<Writer>,
  opts: WriterConformanceOptions = {},
): void {
  describe(`writer conformance: ${name}`, () => {
    let writer: Writer | undefined;
    let scratch: { dir: string; cleanup: () => Promise<void> } | undefined;
    const get = async () => (writer ??= await makeWriter());
    const files = async (): Promise<string[]> => {
      if (opts.files) return opts.files();
      scratch ??= await tempDir('vss-wconf');
      const f = path.join(scratch.dir, 'data.bin');
      await writeFile(f, 'data');
      return [f];
    };
    afterAll(async () => {
      await opts.teardown?.();
      await scratch?.cleanup();
    });
    const managed = async () => new ManagedWriter(await get(), () => TEST_LIMITS.writerCallbackMs!);

    it('identify returns valid metadata, the same twice', async () => {
      const w = await get();
      const fails: string[] = [];
      const signal = new AbortController().signal;
      const a = await w.identify({ signal, setFailure: (k, m) => fails.push(`${k}: ${m}`) });
      const b = await w.identify({ signal, setFailure: (k, m) => fails.push(`${k}: ${m}`) });
      expect(a, 'identify returned false').not.toBe(false);
      expect(fails).toEqual([]);
      const meta = validateWriterMetadata(w.name, a);
      expect(validateWriterMetadata(w.name, b)).toEqual(meta);
      expect(typeof w.name).toBe('string');
      expect(w.name.length).toBeGreaterThan(0);
    });

    it('callbacks resolve to true and never throw through the whole sequence', async () => {
      const w = await get();
      const meta = (await w.identify({ signal: new AbortController().signal, setFailure: () => {} })) as WriterMetadata;
      const comps = selectedFrom(meta);
      const f = await files();
      for (const phase of SEQUENCE) {
        const { ctx, failures } = rawContext(phase, comps, f);
        const r = await w[phase](ctx);
        expect(r, `${phase} returned ${String(r)} (${failures.join('; ')})`).toBe(true);
        expect(failures, `${phase} set failures`).toEqual([]);
      }
    });

    it('states follow STABLE → WAITING_FOR_FREEZE → ... → STABLE', async () => {
      const m = await managed();
      expect((await m.identify()).ok).toBe(true);
      const input: WriterCallInput = {
        backupType: 'full',
        snapshotSetId: randomUUID(),
        components: selectedFrom(m.metadata!),
        snapshotSetFiles: await files(),
        snapshots: [],
      };
      const seen: string[] = [];
      for (const phase of SEQUENCE) {
        const o = await m.call(phase, input);
        expect(o.ok, `${phase}: ${o.failure?.message}`).toBe(true);
        seen.push(m.state);
      }
      expect(seen).toEqual(STATES_AFTER);
      expect(m.failure).toBeUndefined();
    });

    for (let stop = 1; stop <= SEQUENCE.length - 1; stop++) {
      const last = SEQUENCE[stop - 1];
      it(`Abort after ${last}: accepted twice, writer STABLE, next backup fine`, async () => {
        const m = await managed();
        await m.identify();
        const input: WriterCallInput = {
          backupType: 'incremental',
          snapshotSetId: randomUUID(),
          components: selectedFrom(m.metadata!),
          snapshotSetFiles: await files(),
          snapshots: [],
        };
        for (const phase of SEQUENCE.slice(0, stop)) expect((await m.call(phase, input)).ok).toBe(true);
        const a1 = await m.call('abort', input);
        const a2 = await m.call('abort', input);
        expect([a1.ok, a2.ok], `${a1.failure?.message} ${a2.failure?.message}`).toEqual([true, true]);
        expect(m.state).toBe('STABLE');
        expect(m.abortCount).toBe(2);
        // The writer is not stuck (e.g. still frozen): a whole new sequence works.
        const again = await managed();
        await again.identify();
        for (const phase of SEQUENCE) expect((await again.call(phase, input)).ok, phase).toBe(true);
      });
    }

    it('a backup through BackupComponents succeeds for every backup type', async () => {
      const w = await get();
      const root = (scratch ??= await tempDir('vss-wconf')).dir;
      const diffAreaRoot = path.join(root, 'areas');
      for (const type of BACKUP_TYPES) {
        const bc = new BackupComponents({
          writers: [w],
          providers: [snapshotProviderAdapter(new CopySnapshotProvider(), { diffAreaRoot })],
          limits: TEST_LIMITS,
        });
        bc.initializeForBackup();
        bc.setBackupState({ type, selectComponents: false });
        const meta = await bc.gatherWriterMetadata();
        expect(meta[0].failure).toBeUndefined();
        bc.startSnapshotSet();
        await bc.addToSnapshotSet(await files());
        await bc.prepareForBackup();
        const report = await bc.doSnapshotSet();
        expect(report.status, `${type}: ${JSON.stringify(report.abort ?? report.writers[0].failure)}`).toBe(
          'succeeded',
        );
        for (const c of report.components) bc.setBackupSucceeded(c, true);
        const status = await bc.backupComplete();
        expect(status[0].state).toBe('STABLE');
        expect(status[0].failure).toBeUndefined();
        expect((await bc.dispose()).autoAborted).toBe(false);
        expect(await entriesUnder(diffAreaRoot)).toBe(0);
      }
    });

    it('a provider failure while it is frozen aborts it cleanly (not its fault: STABLE, not failed)', async () => {
      const w = await get();
      const provider = new ScriptedProvider('broken', { commit: 'throw' });
      const bc = new BackupComponents({ writers: [w], providers: [provider], limits: TEST_LIMITS });
      bc.initializeForBackup();
      bc.setBackupState({ type: 'full', selectComponents: false });
      await bc.gatherWriterMetadata();
      bc.startSnapshotSet();
      await bc.addToSnapshotSet(await files());
      await bc.prepareForBackup();
      const report = await bc.doSnapshotSet();
      expect(report.status).toBe('failed');
      expect(report.abort).toMatchObject({ by: 'provider', phase: 'commit' });
      expect(report.writers[0].state).toBe('STABLE');
      expect(report.writers[0].abortCount).toBe(1);
      await bc.abortBackup();
      expect(bc.gatherWriterStatus()[0].abortCount).toBe(2);
      await bc.dispose();
      expect(provider.held()).toBe(0);
    });
  });
}

export interface ProviderSetup {
  provider: Provider;
  /** Files the provider can snapshot (at least one; two or more to test a set of two volumes). */
  files: string[];
  /** What the provider still holds (diff areas, clones): 0 once everything was released. */
  held: () => Promise<number>;
}

const PHASES = ['beginPrepare', 'endPrepare', 'preCommit', 'commit', 'postCommit'] as const;

/**
 * Checks a provider: it supports its files; commit produces a snapshot of every volume (with a storage
 * snapshot, its content is the content at commit, whatever is written after); abort after any phase releases
 * everything and is idempotent; a set through BackupComponents succeeds and dispose releases it.
 */
export function providerConformance(name: string, setup: (dir: string) => Promise<ProviderSetup>): void {
  describe(`provider conformance: ${name}`, () => {
    const seed = seedFrom('TIDEMARK_VSS_SEED', 20240601);
    let scratch: { dir: string; cleanup: () => Promise<void> } | undefined;
    let n = 0;
    afterAll(async () => scratch?.cleanup());
    const fresh = async () => {
      scratch ??= await tempDir('vss-pconf');
      const dir = path.join(scratch.dir, String(++n));
      await mkdir(dir, { recursive: true });
      return setup(dir);
    };
    const ctx = (): ProviderContext => ({ snapshotSetId: randomUUID(), signal: new AbortController().signal });

    it('isSupported accepts its files', async () => {
      const s = await fresh();
      expect(await s.provider.isSupported(s.files)).toBeUndefined();
    });

    it(`commit produces a snapshot of each volume holding the content at commit (seed ${seed})`, async () => {
      const s = await fresh();
      const r = rng(seed);
      const before = new Map<string, Buffer>();
      for (const f of s.files) {
        const data = r.bytes(64 * 1024 + r.int(4096));
        await writeFile(f, data);
        before.set(path.resolve(f), data);
      }
      const c = ctx();
      const volumes =
        s.files.length >= 2
          ? [
              { snapshotId: randomUUID(), files: s.files.slice(0, 1) },
              { snapshotId: randomUUID(), files: s.files.slice(1) },
            ]
          : [{ snapshotId: randomUUID(), files: s.files }];
      for (const v of volumes) await s.provider.beginPrepare(c, v);
      await s.provider.endPrepare(c);
      await s.provider.preCommit(c);
      await s.provider.commit(c);
      // Overwrite every live file after the instant, through the project's file layer.
      for (const f of s.files) {
        const live = await NodeFile.open(f, 'r+');
        await live.write(Buffer.alloc(8192, 0xee), 0);
        await live.datasync();
        await live.close();
      }
      const snaps = await s.provider.postCommit(c);
      expect(snaps.map((x) => x.snapshotId).sort()).toEqual(volumes.map((v) => v.snapshotId).sort());
      for (const v of volumes) {
        const snap = snaps.find((x) => x.snapshotId === v.snapshotId)!;
        expect([...snap.files].map((f) => path.resolve(f))).toEqual(v.files.map((f) => path.resolve(f)));
        expect(snap.createdAt).toBeInstanceOf(Date);
        if (!snap.storage) continue;
        for (const f of v.files) {
          const view = await snap.storage.openFile(path.resolve(f));
          const want = before.get(path.resolve(f))!;
          const got = Buffer.alloc(want.length);
          await view.read(got, 0);
          expect(view.size()).toBe(want.length);
          expect(got.equals(want), `${f} in the snapshot differs from the content at commit`).toBe(true);
          await view.close();
        }
      }
      await s.provider.deleteSnapshots(c);
      expect(await s.held()).toBe(0);
      for (const snap of snaps)
        if (snap.storage) await expect(snap.storage.openFile(snap.files[0])).rejects.toMatchObject({ code: 'CLOSED' });
    });

    for (let k = 1; k <= PHASES.length; k++) {
      it(`abort after ${PHASES[k - 1]} releases everything, twice, and an unknown set is fine`, async () => {
        const s = await fresh();
        const c = ctx();
        for (const phase of PHASES.slice(0, k)) {
          if (phase === 'beginPrepare') await s.provider.beginPrepare(c, { snapshotId: randomUUID(), files: s.files });
          else await s.provider[phase](c);
        }
        await s.provider.abort(c);
        expect(await s.held()).toBe(0);
        await s.provider.abort(c);
        await s.provider.abort(ctx());
        expect(await s.held()).toBe(0);
      });
    }

    it('through the framework: a full set, snapshots reachable, dispose releases them', async () => {
      const s = await fresh();
      const bc = new BackupComponents({ providers: [s.provider], limits: TEST_LIMITS });
      bc.initializeForBackup();
      bc.setBackupState({ type: 'copy', selectComponents: true });
      await bc.gatherWriterMetadata();
      bc.startSnapshotSet();
      const id = await bc.addToSnapshotSet(s.files, s.provider.name);
      await bc.prepareForBackup();
      const report = await bc.doSnapshotSet();
      expect(report.status, JSON.stringify(report.abort)).toBe('succeeded');
      expect(report.snapshots.map((x) => x.snapshotId)).toEqual([id]);
      expect(report.providers[0]).toMatchObject({ provider: s.provider.name, state: 'postcommitted' });
      expect(bc.snapshotOf(s.files[0])?.info.snapshotId).toBe(id);
      await bc.backupComplete();
      expect(await bc.dispose()).toEqual({ autoAborted: false, warnings: [] });
      expect(await s.held()).toBe(0);
    });

    it('the managed wrapper refuses an out-of-order call and still aborts cleanly', async () => {
      const s = await fresh();
      const m = new ManagedProvider(s.provider, randomUUID(), () => 5_000);
      await expect(m.commit()).rejects.toMatchObject({ code: 'BAD_STATE' });
      expect((await m.beginPrepare({ snapshotId: randomUUID(), files: s.files })).ok).toBe(true);
      expect(m.holdsResources).toBe(true);
      expect((await m.abort()).ok).toBe(true);
      expect(m.state).toBe('aborted');
      expect(await s.held()).toBe(0);
    });
  });
}

/** The storage-snapshot adapter's setup over any SnapshotProvider: files in `dir`, diff areas in `dir/areas`. */
export function adapterSetup(make: () => import('../../src/snapshot/provider.js').SnapshotProvider) {
  return async (dir: string): Promise<ProviderSetup> => {
    const diffAreaRoot = path.join(dir, 'areas');
    await mkdir(diffAreaRoot, { recursive: true });
    const files = [path.join(dir, 'a.vhdx'), path.join(dir, 'b.vhdx')];
    for (const f of files) await writeFile(f, Buffer.alloc(4096, 1));
    return {
      provider: snapshotProviderAdapter(make(), { diffAreaRoot }),
      files,
      held: () => entriesUnder(diffAreaRoot),
    };
  };
}
