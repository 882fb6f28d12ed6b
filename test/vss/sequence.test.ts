/**
 * The requester sequence of HYPERV-BACKUP-MODEL.md §2 as writers, providers and the host see it: order of
 * every call, what each context carries, the report; and an end-to-end backup of an application that writes
 * all the time, whose snapshot must hold whole records only (Freeze worked) and whose log is truncated after
 * a full backup (BackupComplete worked).
 */
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { CowProvider } from '../../src/snapshot/cow.js';
import { NodeFile } from '../../src/util/file.js';
import { BackupComponents, snapshotProviderAdapter, type BackupType, type VssEvent } from '../../src/vss/index.js';
import { tempDir } from '../helpers/peers.js';
import {
  AppWriter,
  CopySnapshotProvider,
  ScriptedProvider,
  ScriptedWriter,
  checkAppDb,
  entriesUnder,
  type Journal,
} from './fixtures.js';
import { harness, phasesOf, prepare } from './harness.js';
import { sleep } from '../helpers/async.js';

describe('the sequence', () => {
  it('calls writers, providers and the host in the model order, and reports every step', async () => {
    const journal: Journal = [];
    const a = new ScriptedWriter({ name: 'A', journal });
    const b = new ScriptedWriter({ name: 'B', journal });
    const provider = new ScriptedProvider('P', {}, journal);
    const events: VssEvent[] = [];
    const h = harness([a, b], provider, journal, {
      holdWrites: async (files) => {
        journal.push(`host.hold ${files.length}`);
        return () => {
          journal.push('host.release');
        };
      },
      onEvent: (e) => events.push(e),
    });
    h.bc.initializeForBackup();
    h.bc.setBackupState({ type: 'incremental', selectComponents: false });
    await h.bc.gatherWriterMetadata();
    const setId = h.bc.startSnapshotSet();
    const v1 = await h.bc.addToSnapshotSet(['/d/a.vhdx']);
    const v2 = await h.bc.addToSnapshotSet(['/d/b.vhdx', '/d/c.vhdx'], 'P');
    await h.bc.prepareForBackup();
    const report = await h.bc.doSnapshotSet();
    for (const c of report.components) h.bc.setBackupSucceeded(c, true);
    await h.bc.backupComplete();
    // Identify happens at gather, before the isSupported calls of addToSnapshotSet.
    expect(journal.slice(0, 4)).toEqual([
      'writer:A.identify',
      'writer:B.identify',
      'provider:P.isSupported',
      'provider:P.isSupported',
    ]);
    expect(journal.slice(4)).toEqual([
      'writer:A.prepareForBackup',
      'writer:B.prepareForBackup',
      'writer:A.prepareForSnapshot',
      'writer:B.prepareForSnapshot',
      'provider:P.beginPrepare',
      'provider:P.beginPrepare',
      'provider:P.endPrepare',
      'writer:A.freeze',
      'writer:B.freeze',
      'host.hold 3',
      'provider:P.preCommit',
      'provider:P.commit',
      'host.release',
      'writer:A.thaw',
      'writer:B.thaw',
      'provider:P.postCommit',
      'writer:A.postSnapshot',
      'writer:B.postSnapshot',
      'writer:A.backupComplete',
      'writer:B.backupComplete',
    ]);
    expect(report).toMatchObject({ snapshotSetId: setId, backupType: 'incremental', status: 'succeeded' });
    expect(report.abort).toBeUndefined();
    expect(report.snapshots.map((s) => [s.snapshotId, s.files, s.provider, s.snapshotSetId])).toEqual([
      [v1, ['/d/a.vhdx'], 'P', setId],
      [v2, ['/d/b.vhdx', '/d/c.vhdx'], 'P', setId],
    ]);
    expect(report.providers).toEqual([
      expect.objectContaining({ provider: 'P', state: 'postcommitted', snapshotIds: [v1, v2] }),
    ]);
    for (const k of ['totalMs', 'freezeWindowMs', 'holdMs', 'commitMs', 'freezeMs', 'thawMs'] as const)
      expect(report.timings[k], k).toBeGreaterThanOrEqual(0);
    expect(report.timings.freezeWindowMs!).toBeGreaterThanOrEqual(report.timings.commitMs!);
    expect(report.warnings).toEqual([]);
    expect(report.writers.map((w) => w.state)).toEqual(['WAITING_FOR_BACKUP_COMPLETE', 'WAITING_FOR_BACKUP_COMPLETE']);
    expect(h.bc.gatherWriterStatus().map((w) => w.state)).toEqual(['STABLE', 'STABLE']);
    expect(h.bc.snapshotOf('/d/c.vhdx')!.handle).toMatchObject({ snapshotId: v2 });
    // Events: one per call, writer and provider, in order.
    expect(events.filter((e) => e.source === 'writer').length).toBe(14);
    expect(events.every((e) => e.outcome === 'ok')).toBe(true);
    expect(await h.bc.dispose()).toEqual({ autoAborted: false, warnings: [] });
    expect(journal.at(-1)).toBe('provider:P.deleteSnapshots');
    expect(provider.held()).toBe(0);
  });

  it('tells each callback the selected components, type, set, files and snapshots', async () => {
    const journal: Journal = [];
    const a = new ScriptedWriter({ name: 'A', journal });
    const b = new ScriptedWriter({ name: 'B', journal });
    const idle = new ScriptedWriter({ name: 'idle', journal });
    const h = harness([a, b, idle], new ScriptedProvider('P', {}, journal), journal);
    await prepare(h, {
      type: 'copy',
      select: [
        { writer: 'A', logicalPath: 'A', name: 'data' },
        { writer: 'B', logicalPath: 'B', name: 'logs' },
      ],
      files: ['/v/one', '/v/two'],
    });
    const report = await h.bc.doSnapshotSet();
    h.bc.setBackupSucceeded({ writer: 'A', logicalPath: 'A', name: 'data' }, true, 'copied 3 GiB');
    h.bc.setBackupSucceeded({ writer: 'B', logicalPath: 'B', name: 'logs' }, false, 'target full');
    await h.bc.backupComplete();
    // A writer with nothing selected takes no part in component mode.
    expect(phasesOf(journal, 'idle')).toEqual(['identify']);
    expect(report.writers.find((w) => w.writer === 'idle')!.participating).toBe(false);
    const byPhase = (w: ScriptedWriter, phase: string) => w.contexts.find((c) => c.phase === phase)!;
    const names = (w: ScriptedWriter, phase: string) =>
      byPhase(w, phase).components.map((c) => `${c.logicalPath}\\${c.name}${c.implicit ? ' (implicit)' : ''}`);
    // The explicit choice plus the non-selectable component, which goes wherever its writer goes.
    expect(names(a, 'prepareForBackup')).toEqual(['A\\data', 'A\\config (implicit)']);
    expect(names(b, 'freeze')).toEqual(['B\\logs', 'B\\config (implicit)']);
    expect(byPhase(a, 'prepareForBackup').components[1].data).toBe('{"writer":"A"}');
    for (const c of a.contexts) {
      expect(c.backupType).toBe('copy');
      expect(c.snapshotSetId).toBe(report.snapshotSetId);
    }
    expect(byPhase(a, 'prepareForSnapshot').snapshotSetFiles).toEqual(['/v/one', '/v/two']);
    expect(byPhase(a, 'freeze').snapshots).toEqual([]);
    expect(byPhase(a, 'postSnapshot').snapshots).toEqual(report.snapshots);
    const done = byPhase(a, 'backupComplete').components;
    expect(done[0]).toMatchObject({ name: 'data', backupSucceeded: true, backupMessage: 'copied 3 GiB' });
    expect(done[1]).toMatchObject({ name: 'config', backupSucceeded: false });
    expect(byPhase(b, 'backupComplete').components[0]).toMatchObject({
      name: 'logs',
      backupSucceeded: false,
      backupMessage: 'target full',
    });
    expect(h.bc.report()!.components.map((c) => [c.writer, c.name, c.status, c.backupSucceeded ?? null])).toEqual([
      ['A', 'data', 'ok', true],
      ['A', 'config', 'ok', null],
      ['B', 'logs', 'ok', false],
      ['B', 'config', 'ok', null],
    ]);
    // A copy that did not succeed makes the backup partial, however good the snapshot was.
    expect(report.status).toBe('succeeded');
    expect(h.bc.report()!.status).toBe('partial');
    await h.bc.dispose();
  });

  it('in non-component mode every component of every writer is in, and a writer that cannot identify makes it partial', async () => {
    const journal: Journal = [];
    const a = new ScriptedWriter({ name: 'A', journal });
    const mute = new ScriptedWriter({ name: 'mute', script: { identify: 'throw' }, journal });
    const h = harness([a, mute], new ScriptedProvider('P', {}, journal), journal);
    await prepare(h);
    const report = await h.bc.doSnapshotSet();
    expect(report.components.map((c) => c.name)).toEqual(['data', 'logs', 'config']);
    expect(report.status).toBe('partial');
    expect(report.writers.find((w) => w.writer === 'mute')).toMatchObject({
      state: 'FAILED_AT_IDENTIFY',
      participating: true,
    });
    await h.bc.backupComplete();
    await h.bc.dispose();
  });

  it('warns when a selected component has files and none of them is in the snapshot set', async () => {
    const journal: Journal = [];
    const w = new ScriptedWriter({
      name: 'W',
      journal,
      components: [
        { name: 'vm1', selectable: true, fileSets: [{ path: '/vms/vm1', filespec: '*.vhdx', recursive: true }] },
        { name: 'vm2', selectable: true, fileSets: [{ path: '/vms/vm2', filespec: '*.vhdx', recursive: false }] },
      ],
    });
    const h = harness([w], new ScriptedProvider('P', {}, journal), journal);
    await prepare(h, {
      select: [
        { writer: 'W', name: 'vm1' },
        { writer: 'W', name: 'vm2' },
      ],
      files: ['/vms/vm1/disks/os.vhdx', '/vms/vm2/disks/os.vhdx'],
    });
    const report = await h.bc.doSnapshotSet();
    expect(report.warnings).toEqual(['component vm2 of writer W: none of its files is in the snapshot set']);
    await h.bc.backupComplete();
    await h.bc.dispose();
  });
});

describe('end to end: an application writing all the time, real files, real snapshots', () => {
  const dirs: { cleanup: () => Promise<void> }[] = [];
  afterAll(async () => {
    for (const d of dirs) await d.cleanup();
  });

  const cases: { provider: string; make: () => import('../../src/snapshot/provider.js').SnapshotProvider }[] = [
    { provider: 'copy (in-test)', make: () => new CopySnapshotProvider() },
    { provider: 'cow', make: () => new CowProvider() },
  ];
  for (const { provider, make } of cases) {
    for (const type of ['full', 'copy'] as BackupType[]) {
      it(`${provider}, ${type} backup: only whole records in the snapshot; the log truncated after a full backup`, async () => {
        const t = await tempDir('vss-e2e');
        dirs.push(t);
        const app = new AppWriter(t.dir);
        await app.start();
        try {
          await sleep(30); // let it write a few records
          const diffAreaRoot = path.join(t.dir, 'areas');
          let heldFor = 0;
          const bc = new BackupComponents({
            writers: [app],
            providers: [snapshotProviderAdapter(make(), { diffAreaRoot })],
            // The host's flush-and-hold: the app is frozen, so there is nothing in flight to hold.
            holdWrites: async () => {
              const t0 = performance.now();
              return () => {
                heldFor = performance.now() - t0;
              };
            },
          });
          bc.initializeForBackup();
          bc.setBackupState({ type, selectComponents: true });
          await bc.gatherWriterMetadata();
          bc.addComponent({ writer: 'app', logicalPath: 'logs', name: 'log' });
          bc.startSnapshotSet();
          await bc.addToSnapshotSet([app.db, app.log]);
          await bc.prepareForBackup();
          const report = await bc.doSnapshotSet();
          expect(report.status, JSON.stringify(report.abort)).toBe('succeeded');
          expect(app.frozen).toBe(false);
          // The app goes on writing while we read the snapshot.
          const before = app.records;
          await sleep(20);
          expect(app.records).toBeGreaterThan(before);
          const snap = bc.snapshotOf(app.db)!;
          expect(snap.storage!.provider).toBe(make().name);
          const view = await snap.storage!.openFile(app.db);
          const db = await checkAppDb(view);
          await view.close();
          expect(db.torn).toEqual([]);
          expect(db.records).toBe(app.recordsAtFreeze);
          expect(db.records).toBeGreaterThan(0);
          expect(heldFor).toBeGreaterThanOrEqual(0);
          expect(report.timings.holdMs).toBeLessThan(10_000);
          for (const c of report.components) bc.setBackupSucceeded(c, true);
          await bc.backupComplete();
          expect(app.logTruncations).toBe(type === 'full' ? 1 : 0);
          await bc.dispose();
          expect(await entriesUnder(diffAreaRoot)).toBe(0);
        } finally {
          await app.stop();
        }
      });
    }
  }

  it('the record checker does see a torn record (so the test above can fail)', async () => {
    const t = await tempDir('vss-torn');
    dirs.push(t);
    const f = path.join(t.dir, 'torn.db');
    const rec = Buffer.alloc(4096 * 2);
    rec.writeUInt32LE(0, 0);
    rec.writeUInt32LE(0, 4092);
    rec.writeUInt32LE(1, 4096); // second record: first half only
    await writeFile(f, rec);
    const file = await NodeFile.open(f, 'r');
    expect(await checkAppDb(file)).toEqual({ records: 1, torn: [1] });
    await file.close();
  });
});
