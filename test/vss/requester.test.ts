/**
 * The requester's object: one backup per BackupComponents, the sequence enforced with typed errors, dispose
 * that aborts (and says so) when the requester forgot to, one backup at a time per writer, and the checks on
 * what writers hand back (metadata, component failures).
 */
import { describe, expect, it } from 'vitest';
import {
  BackupComponents,
  ManagedWriter,
  fileSetMatches,
  validateWriterMetadata,
  type WriterMetadata,
} from '../../src/vss/index.js';
import { ScriptedProvider, ScriptedWriter, type Journal } from './fixtures.js';
import { FAST, harness, prepare, wholeBackup } from './harness.js';

function simple(journal: Journal = []) {
  const w = new ScriptedWriter({ name: 'W', journal });
  const p = new ScriptedProvider('P', {}, journal);
  return { w, p, h: harness([w], p, journal) };
}

describe('one BackupComponents per backup', () => {
  it('refuses a second backup after BackupComplete, and everything after dispose', async () => {
    const { h } = simple();
    const { report } = await wholeBackup(h);
    expect(report.status).toBe('succeeded');
    expect(() => h.bc.initializeForBackup()).toThrow(expect.objectContaining({ code: 'CLOSED' }));
    const { h: h2 } = simple();
    await prepare(h2);
    await h2.bc.doSnapshotSet();
    await h2.bc.backupComplete();
    for (const call of [
      () => h2.bc.initializeForBackup(),
      () => h2.bc.setBackupState({ type: 'full', selectComponents: false }),
      () => h2.bc.startSnapshotSet(),
    ])
      expect(call).toThrow(
        expect.objectContaining({ code: 'BAD_STATE', message: expect.stringContaining('create a new one') }),
      );
    await expect(h2.bc.prepareForBackup()).rejects.toMatchObject({ code: 'BAD_STATE' });
    await expect(h2.bc.doSnapshotSet()).rejects.toMatchObject({ code: 'BAD_STATE' });
    await expect(h2.bc.abortBackup()).rejects.toMatchObject({ code: 'BAD_STATE' });
    await h2.bc.dispose();
    await expect(h2.bc.gatherWriterMetadata()).rejects.toMatchObject({ code: 'CLOSED' });
    expect(await h2.bc.dispose()).toEqual({ autoAborted: false, warnings: [] }); // idempotent
  });

  it('refuses a second backup after AbortBackup', async () => {
    const { h } = simple();
    await prepare(h);
    await h.bc.abortBackup();
    await expect(h.bc.doSnapshotSet()).rejects.toMatchObject({ code: 'BAD_STATE' });
    expect(() => h.bc.initializeForBackup()).toThrow(expect.objectContaining({ code: 'BAD_STATE' }));
  });

  it('enforces the order of the sequence', async () => {
    const { h } = simple();
    const bc = h.bc;
    expect(() => bc.setBackupState({ type: 'full', selectComponents: false })).toThrow(
      expect.objectContaining({ code: 'BAD_STATE' }),
    );
    bc.initializeForBackup();
    expect(() => bc.initializeForBackup()).toThrow(expect.objectContaining({ code: 'BAD_STATE' }));
    await expect(bc.gatherWriterMetadata()).rejects.toMatchObject({ code: 'BAD_STATE' });
    expect(() => bc.setBackupState({ type: 'weekly' as 'full', selectComponents: false })).toThrow(
      expect.objectContaining({ code: 'INVALID_ARGUMENT', message: expect.stringContaining('full, incremental') }),
    );
    bc.setBackupState({ type: 'differential', selectComponents: true });
    expect(() => bc.startSnapshotSet()).toThrow(expect.objectContaining({ code: 'BAD_STATE' }));
    await bc.gatherWriterMetadata();
    await expect(bc.addToSnapshotSet(['/a'])).rejects.toMatchObject({ code: 'BAD_STATE' });
    expect(() => bc.addComponent({ writer: 'nobody', name: 'x' })).toThrow(
      expect.objectContaining({ code: 'NOT_FOUND' }),
    );
    expect(() => bc.addComponent({ writer: 'W', logicalPath: 'W', name: 'nope' })).toThrow(
      expect.objectContaining({ code: 'NOT_FOUND', message: 'writer W has no component W\\nope' }),
    );
    bc.addComponent({ writer: 'W', logicalPath: 'W', name: 'data' });
    expect(() => bc.addComponent({ writer: 'W', logicalPath: 'W', name: 'data' })).toThrow(
      expect.objectContaining({ code: 'ALREADY_EXISTS' }),
    );
    await expect(bc.doSnapshotSet()).rejects.toMatchObject({ code: 'BAD_STATE' });
    const setId = bc.startSnapshotSet();
    expect(setId).toMatch(/^[0-9a-f-]{36}$/);
    expect(() => bc.startSnapshotSet()).toThrow(expect.objectContaining({ code: 'BAD_STATE' }));
    await expect(bc.addToSnapshotSet([])).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
    await expect(bc.addToSnapshotSet(['/d/x', '/d/x'])).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
    await expect(bc.addToSnapshotSet(['/d/x'], 'Q')).rejects.toMatchObject({ code: 'NOT_FOUND' });
    await bc.addToSnapshotSet(['/d/x']);
    await expect(bc.addToSnapshotSet(['/d/../d/x'])).rejects.toMatchObject({ code: 'ALREADY_EXISTS' });
    await bc.prepareForBackup();
    expect(() => bc.addComponent({ writer: 'W', logicalPath: 'W', name: 'logs' })).toThrow(
      expect.objectContaining({ code: 'BAD_STATE' }),
    );
    expect(() => bc.setBackupSucceeded({ writer: 'W', logicalPath: 'W', name: 'data' }, true)).toThrow(
      expect.objectContaining({ code: 'BAD_STATE' }),
    );
    await expect(bc.backupComplete()).rejects.toMatchObject({ code: 'BAD_STATE' });
    const running = bc.doSnapshotSet();
    await expect(bc.doSnapshotSet()).rejects.toMatchObject({ code: 'BUSY' });
    await running;
    expect(() => bc.setBackupSucceeded({ writer: 'W', logicalPath: 'W', name: 'logs' }, true)).toThrow(
      expect.objectContaining({ code: 'NOT_FOUND' }),
    );
    await bc.backupComplete();
    await bc.dispose();
  });

  it('addComponent needs component mode; constructor refuses duplicate names and bad limits', async () => {
    const { h } = simple();
    h.bc.initializeForBackup();
    h.bc.setBackupState({ type: 'full', selectComponents: false });
    await h.bc.gatherWriterMetadata();
    expect(() => h.bc.addComponent({ writer: 'W', logicalPath: 'W', name: 'data' })).toThrow(
      expect.objectContaining({ code: 'BAD_STATE', message: expect.stringContaining('component mode') }),
    );
    const w = new ScriptedWriter({ name: 'same' });
    expect(() => new BackupComponents({ writers: [w, new ScriptedWriter({ name: 'same' })] })).toThrow(
      expect.objectContaining({ code: 'INVALID_ARGUMENT' }),
    );
    expect(() => new BackupComponents({ providers: [new ScriptedProvider('p'), new ScriptedProvider('p')] })).toThrow(
      expect.objectContaining({ code: 'INVALID_ARGUMENT' }),
    );
    expect(() => new BackupComponents({ limits: { holdWritesMs: 0 } })).toThrow(
      expect.objectContaining({ code: 'INVALID_ARGUMENT', message: expect.stringContaining('holdWritesMs') }),
    );
  });

  it('no provider at all, or none that supports the files: NOT_SUPPORTED', async () => {
    const bc = new BackupComponents({});
    bc.initializeForBackup();
    bc.setBackupState({ type: 'full', selectComponents: false });
    await bc.gatherWriterMetadata();
    bc.startSnapshotSet();
    await expect(bc.addToSnapshotSet(['/x'])).rejects.toMatchObject({ code: 'NOT_SUPPORTED' });
  });

  it('picks the first provider that supports the files, or the one named', async () => {
    const journal: Journal = [];
    const picky = new ScriptedProvider('picky', {}, journal);
    const any = new ScriptedProvider('any', {}, journal);
    (picky as unknown as { isSupported: () => Promise<string> }).isSupported = async () => 'not on this volume';
    const bc = new BackupComponents({ providers: [picky, any], limits: FAST });
    bc.initializeForBackup();
    bc.setBackupState({ type: 'full', selectComponents: false });
    await bc.gatherWriterMetadata();
    bc.startSnapshotSet();
    await bc.addToSnapshotSet(['/x']);
    await expect(bc.addToSnapshotSet(['/y'], 'picky')).rejects.toMatchObject({
      code: 'NOT_SUPPORTED',
      message: expect.stringContaining('picky: not on this volume'),
    });
    await bc.prepareForBackup();
    const report = await bc.doSnapshotSet();
    expect(report.snapshots.map((s) => s.provider)).toEqual(['any']);
    await bc.backupComplete();
    await bc.dispose();
  });
});

describe('dispose without BackupComplete or AbortBackup', () => {
  it('after PrepareForBackup: aborts the writers and says so', async () => {
    const { w, h } = simple();
    await prepare(h);
    const d = await h.bc.dispose();
    expect(d.autoAborted).toBe(true);
    expect(d.warnings).toEqual([
      'disposed after PrepareForBackup without BackupComplete or AbortBackup: aborted automatically',
    ]);
    expect(w.count('abort')).toBe(1);
    expect(h.bc.gatherWriterStatus()[0]).toMatchObject({ state: 'STABLE', abortCount: 1 });
  });

  it('after a successful DoSnapshotSet: aborts and releases the snapshot', async () => {
    const { w, p, h } = simple();
    await prepare(h);
    await h.bc.doSnapshotSet();
    expect(p.held()).toBeGreaterThan(0);
    const d = await h.bc.dispose();
    expect(d.autoAborted).toBe(true);
    expect(w.count('abort')).toBe(1);
    expect(w.count('backupComplete')).toBe(0);
    expect(p.held()).toBe(0);
    expect(h.bc.report()!.status).toBe('failed');
    expect(h.bc.snapshots()).toEqual([]);
  });

  it('after a failed DoSnapshotSet: the writers hear Abort a second time (the requester must abort)', async () => {
    const journal: Journal = [];
    const w = new ScriptedWriter({ name: 'W', script: { thaw: 'throw' }, journal });
    const h = harness([w], new ScriptedProvider('P', {}, journal), journal);
    await prepare(h);
    await h.bc.doSnapshotSet();
    expect(w.count('abort')).toBe(1);
    expect((await h.bc.dispose()).autoAborted).toBe(true);
    expect(w.count('abort')).toBe(2);
  });

  it('before PrepareForBackup: nothing to abort, nothing said', async () => {
    const { w, h } = simple();
    h.bc.initializeForBackup();
    h.bc.setBackupState({ type: 'full', selectComponents: false });
    await h.bc.gatherWriterMetadata();
    expect(await h.bc.dispose()).toEqual({ autoAborted: false, warnings: [] });
    expect(w.count('abort')).toBe(0);
  });
});

describe('one backup at a time per writer', () => {
  it('a second BackupComponents using a writer taking part in a backup gets BUSY until it ends', async () => {
    const shared = new ScriptedWriter({ name: 'shared' });
    const mk = () => harness([shared], new ScriptedProvider('P'), []);
    const first = mk();
    await prepare(first);
    const second = mk();
    await expect(prepare(second)).rejects.toMatchObject({ code: 'BUSY', message: expect.stringContaining('shared') });
    await first.bc.doSnapshotSet();
    await first.bc.backupComplete();
    const third = mk();
    const { report } = await wholeBackup(third);
    expect(report.status).toBe('succeeded');
    await first.bc.dispose();
    await second.bc.dispose();
  });
});

describe('what writers hand back is checked', () => {
  const bad: [string, unknown, RegExp][] = [
    ['not an object', 42, /not an object/],
    ['no components array', {}, /components is not an array/],
    ['empty name', { components: [{ name: '', selectable: true, fileSets: [] }] }, /name is empty/],
    [
      'duplicate component',
      {
        components: [
          { name: 'a', selectable: true, fileSets: [] },
          { name: 'a', logicalPath: '', selectable: false, fileSets: [] },
        ],
      },
      /component a is listed twice/,
    ],
    ['selectable missing', { components: [{ name: 'a', fileSets: [] }] }, /selectable is not a boolean/],
    [
      'bad file set',
      { components: [{ name: 'a', selectable: true, fileSets: [{ path: '/x', filespec: '*', recursive: 'yes' }] }] },
      /recursive is not a boolean/,
    ],
    ['control characters', { components: [{ name: 'a\nb', selectable: true, fileSets: [] }] }, /control characters/],
    [
      'huge opaque data',
      { components: [{ name: 'a', selectable: true, fileSets: [], data: 'x'.repeat((1 << 20) + 1) }] },
      /data is longer/,
    ],
  ];
  for (const [label, meta, re] of bad) {
    it(`invalid metadata (${label}) is refused with a clear message; through Identify it is FAILED_AT_IDENTIFY`, async () => {
      expect(() => validateWriterMetadata('w', meta)).toThrow(re);
      const w = new ScriptedWriter({ name: 'w' });
      w.identify = async () => meta as WriterMetadata;
      const m = new ManagedWriter(w, () => 1000);
      const o = await m.identify();
      expect(o.ok).toBe(false);
      expect(m.state).toBe('FAILED_AT_IDENTIFY');
      expect(m.failure!.message).toMatch(re);
      expect(m.metadata).toBeUndefined();
    });
  }

  it('a writer naming a component outside the backup fails NONRETRYABLE; a failure set after returning is ignored', async () => {
    const journal: Journal = [];
    const w = new ScriptedWriter({
      name: 'W',
      journal,
      script: { prepareForSnapshot: { components: [{ name: 'ghost', kind: 'RETRYABLE' }] } },
    });
    let late: (() => void) | undefined;
    const quiet = new ScriptedWriter({ name: 'Q', journal });
    quiet.thaw = async (ctx) => {
      late = () => ctx.setFailure('NONRETRYABLE', 'too late');
      return true;
    };
    const h = harness([w, quiet], new ScriptedProvider('P', {}, journal), journal);
    const { report } = await wholeBackup(h);
    const ws = report.writers.find((x) => x.writer === 'W')!;
    expect(ws.state).toBe('FAILED_AT_PREPARE_SNAPSHOT');
    expect(ws.failure!.message).toMatch(/component ghost, which is not in this backup/);
    late!();
    expect(h.bc.gatherWriterStatus().find((x) => x.writer === 'Q')!.failure).toBeUndefined();
  });

  it('file specs: * and ? on the file name, recursive for sub-directories', () => {
    const fs = (path: string, filespec: string, recursive: boolean) => ({ path, filespec, recursive });
    expect(fileSetMatches(fs('/vms', '*.vhdx', false), '/vms/a.vhdx')).toBe(true);
    expect(fileSetMatches(fs('/vms', '*.vhdx', false), '/vms/sub/a.vhdx')).toBe(false);
    expect(fileSetMatches(fs('/vms/', '*.vhdx', true), '/vms/sub/a.vhdx')).toBe(true);
    expect(fileSetMatches(fs('/vms', '*.vhdx', true), '/vmsx/a.vhdx')).toBe(false);
    expect(fileSetMatches(fs('/vms', 'disk?.vhdx', false), '/vms/disk1.vhdx')).toBe(true);
    expect(fileSetMatches(fs('/vms', 'disk?.vhdx', false), '/vms/disk10.vhdx')).toBe(false);
    expect(fileSetMatches(fs('/vms', '*', false), '/vms/anything')).toBe(true);
    expect(fileSetMatches(fs('/vms', 'a*b*c', false), '/vms/aXbYbZc')).toBe(true);
    expect(fileSetMatches(fs('/vms', 'a*b*c', false), '/vms/aXbYbZ')).toBe(false);
    expect(fileSetMatches(fs('/', '*.vhdx', true), '/deep/down/x.vhdx')).toBe(true);
  });
});
