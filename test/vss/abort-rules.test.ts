/**
 * Every abort rule of HYPERV-BACKUP-MODEL.md §2, driven by a writer or a provider that fails at each phase in
 * each way (phases × failure kinds): Abort is raised by Freeze or Thaw failing or timing out and by a provider
 * failure after PrepareForSnapshot; a failure in PrepareForSnapshot or PostSnapshot does not raise it; a
 * throw is a NONRETRYABLE failure and a hang a TIMEOUT, and neither ever reaches the requester.
 */
import { describe, expect, it } from 'vitest';
import type { WriterFailureKind, WriterPhase, WriterState } from '../../src/vss/index.js';
import { ScriptedProvider, ScriptedWriter, type Behaviour, type Journal, type ProviderBehaviour } from './fixtures.js';
import { harness, phasesOf, prepare, wholeBackup } from './harness.js';
import { ManualClock } from '../helpers/clock.js';

const KINDS: { label: string; b: Behaviour; kind: WriterFailureKind }[] = [
  { label: 'throws', b: 'throw', kind: 'NONRETRYABLE' },
  { label: 'returns false without a failure', b: 'false', kind: 'NONRETRYABLE' },
  { label: 'hangs', b: 'hang', kind: 'TIMEOUT' },
  { label: 'returns a non-boolean', b: 'not-boolean', kind: 'NONRETRYABLE' },
  { label: 'sets RETRYABLE and returns false', b: { fail: 'RETRYABLE', fatal: true }, kind: 'RETRYABLE' },
  {
    label: 'sets OUTOFRESOURCES and returns false',
    b: { fail: 'OUTOFRESOURCES', fatal: true },
    kind: 'OUTOFRESOURCES',
  },
];

const FAILED_AT: Record<WriterPhase, WriterState> = {
  identify: 'FAILED_AT_IDENTIFY',
  prepareForBackup: 'FAILED_AT_PREPARE_BACKUP',
  prepareForSnapshot: 'FAILED_AT_PREPARE_SNAPSHOT',
  freeze: 'FAILED_AT_FREEZE',
  thaw: 'FAILED_AT_THAW',
  postSnapshot: 'FAILED_AT_POST_SNAPSHOT',
  backupComplete: 'FAILED_AT_BACKUP_COMPLETE',
  abort: 'FAILED_AT_ABORT',
};

/** Whether a fatal failure in this phase raises Abort (the model's rule), and whether a snapshot survives. */
const RULE: Record<Exclude<WriterPhase, 'abort'>, { aborts: boolean }> = {
  identify: { aborts: false },
  prepareForBackup: { aborts: false },
  prepareForSnapshot: { aborts: false },
  freeze: { aborts: true },
  thaw: { aborts: true },
  postSnapshot: { aborts: false },
  backupComplete: { aborts: false },
};

function setup(phase: WriterPhase, b: Behaviour) {
  const journal: Journal = [];
  // A hang costs a callback limit on this clock, which the test drives (clock.run): no real waiting.
  const clock = new ManualClock();
  const bad = new ScriptedWriter({ name: 'bad', script: { [phase]: b }, journal, clock });
  const good = new ScriptedWriter({ name: 'good', journal, clock });
  const provider = new ScriptedProvider('prov', {}, journal, clock);
  return { journal, bad, good, provider, clock, h: harness([bad, good], provider, journal, { clock }) };
}

describe('a writer failing fatally, phase × failure kind', () => {
  for (const phase of Object.keys(RULE) as (keyof typeof RULE)[]) {
    for (const k of KINDS) {
      it(`${phase}: the writer ${k.label}`, async () => {
        const { journal, bad, good, provider, clock, h } = setup(phase, k.b);
        const { report, autoAborted } = await clock.run(wholeBackup(h));
        const status = h.bc.gatherWriterStatus();
        const badStatus = status.find((w) => w.writer === 'bad')!;
        const goodStatus = status.find((w) => w.writer === 'good')!;
        expect(badStatus.state).toBe(FAILED_AT[phase]);
        expect(badStatus.failure).toMatchObject({ kind: k.kind, phase, fatal: true });
        expect(autoAborted).toBe(false);
        expect(provider.held()).toBe(0);
        expect(bad.frozen || good.frozen, 'a writer was left frozen').toBe(false);

        if (RULE[phase].aborts) {
          // Abort raised: the set fails, every writer past PrepareForBackup gets Abort (and again from the
          // requester's abortBackup), the provider releases the set, nobody gets PostSnapshot.
          expect(report.status).toBe('failed');
          expect(report.abort).toMatchObject({ by: 'writer', name: 'bad', phase, kind: k.kind });
          if (k.kind === 'TIMEOUT') expect(report.abort!.limit).toBe('callback');
          expect(report.snapshots).toEqual([]);
          expect(bad.count('abort')).toBe(2);
          expect(good.count('abort')).toBe(2);
          expect(goodStatus.state).toBe('STABLE');
          expect(goodStatus.failure).toBeUndefined();
          expect(provider.calls).toContain('abort');
          expect(good.count('postSnapshot')).toBe(0);
          if (phase === 'freeze') {
            expect(provider.calls).not.toContain('commit');
            expect(good.count('thaw')).toBe(0);
          } else {
            // Thaw comes after the commit: the snapshot made is discarded.
            expect(provider.calls).toContain('commit');
            expect(provider.calls).not.toContain('postCommit');
          }
        } else {
          // No Abort: the snapshot is made without the failed writer, whose components fail.
          expect(report.abort).toBeUndefined();
          expect(bad.count('abort') + good.count('abort')).toBe(0);
          expect(provider.calls).toContain('commit');
          expect(provider.calls).toContain('deleteSnapshots');
          expect(goodStatus.state).toBe('STABLE');
          expect(good.count('backupComplete')).toBe(1);
          if (phase === 'backupComplete') {
            // The snapshot set succeeded; the failure shows once BackupComplete ran.
            expect(report.status).toBe('succeeded');
            expect(h.bc.report()!.status).toBe('partial');
          } else {
            expect(report.status).toBe('partial');
            const badComps = report.components.filter((c) => c.writer === 'bad');
            if (phase === 'identify')
              expect(badComps).toEqual([]); // no metadata, no components
            else {
              expect(badComps.length).toBe(3);
              for (const c of badComps) expect(c).toMatchObject({ status: 'failed', failure: { kind: k.kind, phase } });
            }
            expect(report.components.filter((c) => c.writer === 'good').every((c) => c.status === 'ok')).toBe(true);
            // A failed writer receives nothing more.
            const seen = phasesOf(journal, 'bad');
            expect(seen.at(-1)).toBe(phase);
          }
        }
      });
    }
  }
});

describe('a writer failing non-fatally (sets a failure, returns true)', () => {
  for (const phase of ['prepareForBackup', 'prepareForSnapshot', 'freeze', 'thaw', 'postSnapshot'] as const) {
    it(`${phase}: the backup goes on, the failure is reported, status partial`, async () => {
      const { bad, h } = setup(phase, { fail: 'OUTOFRESOURCES', fatal: false });
      const { report } = await wholeBackup(h);
      expect(report.abort).toBeUndefined();
      expect(report.status).toBe('partial');
      const s = report.writers.find((w) => w.writer === 'bad')!;
      expect(s.failure).toMatchObject({ kind: 'OUTOFRESOURCES', phase, fatal: false });
      expect(s.state).toBe('WAITING_FOR_BACKUP_COMPLETE');
      expect(bad.count('postSnapshot')).toBe(1);
      expect(bad.count('backupComplete')).toBe(1);
      expect(report.snapshots.length).toBe(1);
    });
  }
});

describe('a provider failing at each phase after PrepareForSnapshot raises Abort', () => {
  const KINDS_P: { label: string; b: ProviderBehaviour; kind: string }[] = [
    { label: 'throws an Error', b: 'throw', kind: 'UNEXPECTED_PROVIDER_ERROR' },
    { label: 'vetoes (TidemarkError)', b: 'veto', kind: 'PROVIDER_VETO' },
    { label: 'hangs', b: 'hang', kind: 'TIMEOUT' },
  ];
  for (const phase of ['beginPrepare', 'endPrepare', 'preCommit', 'commit', 'postCommit'] as const) {
    for (const k of KINDS_P) {
      it(`${phase}: the provider ${k.label}`, async () => {
        const journal: Journal = [];
        const clock = new ManualClock();
        const a = new ScriptedWriter({ name: 'a', journal, clock });
        const b = new ScriptedWriter({ name: 'b', journal, clock });
        const provider = new ScriptedProvider('prov', { [phase]: k.b }, journal, clock);
        const h = harness([a, b], provider, journal, {
          clock,
          limits: { writerCallbackMs: 1_000, providerCallMs: 120, commitLimitMs: 120, holdWritesMs: 2_000 },
        });
        const { report } = await clock.run(wholeBackup(h));
        expect(report.status).toBe('failed');
        expect(report.abort).toMatchObject({ by: 'provider', name: 'prov', phase, kind: k.kind });
        if (k.kind === 'TIMEOUT')
          expect(report.abort!.limit).toBe(phase === 'commit' || phase === 'preCommit' ? 'commit' : 'callback');
        expect(report.providers[0].failure).toMatchObject({ kind: k.kind, phase });
        if (k.kind === 'PROVIDER_VETO') expect(report.providers[0].failure!.code).toBe('IO_ERROR');
        for (const w of [a, b]) {
          expect(w.count('abort')).toBe(2); // from the set, then from the requester
          expect(w.frozen).toBe(false);
          expect(w.count('postSnapshot')).toBe(0);
        }
        for (const s of report.writers) expect(s).toMatchObject({ state: 'STABLE', abortCount: 1 });
        expect(report.writers.every((s) => s.failure === undefined)).toBe(true);
        // Writers were frozen exactly when the failure came after endPrepare.
        const frozeFirst = phase !== 'beginPrepare' && phase !== 'endPrepare';
        expect(a.count('freeze')).toBe(frozeFirst ? 1 : 0);
        expect(a.count('thaw')).toBe(phase === 'postCommit' ? 1 : 0);
        expect(provider.held()).toBe(0);
        expect(report.snapshots).toEqual([]);
      });
    }
  }

  it('a provider whose abort fails too: a warning, no crash, the writers still aborted', async () => {
    const journal: Journal = [];
    const a = new ScriptedWriter({ name: 'a', journal });
    const provider = new ScriptedProvider('prov', { commit: 'throw', abort: 'throw' }, journal);
    const h = harness([a], provider, journal);
    const { report } = await wholeBackup(h);
    expect(report.status).toBe('failed');
    expect(report.warnings.some((w) => /failed to abort/.test(w))).toBe(true);
    expect(a.count('abort')).toBe(2);
  });

  it('isSupported failing or refusing: addToSnapshotSet says NOT_SUPPORTED with the reason', async () => {
    for (const b of ['throw', 'hang'] as const) {
      const provider = new ScriptedProvider('prov', { isSupported: b });
      const h = harness([], provider, []);
      h.bc.initializeForBackup();
      h.bc.setBackupState({ type: 'full', selectComponents: false });
      await h.bc.gatherWriterMetadata();
      h.bc.startSnapshotSet();
      await expect(h.bc.addToSnapshotSet(['/x/disk.vhdx'])).rejects.toMatchObject({
        code: 'NOT_SUPPORTED',
        message: expect.stringMatching(b === 'throw' ? /isSupported failed: prov broke/ : /isSupported took more/),
      });
      await h.bc.dispose();
    }
    const h = harness([], new ScriptedProvider('prov'), []);
    h.bc.initializeForBackup();
    h.bc.setBackupState({ type: 'full', selectComponents: false });
    await h.bc.gatherWriterMetadata();
    h.bc.startSnapshotSet();
    await expect(h.bc.addToSnapshotSet(['/x/unsupported.vhdx'])).rejects.toMatchObject({
      code: 'NOT_SUPPORTED',
      message: expect.stringContaining('prov: prov cannot snapshot that'),
    });
  });
});

describe('Abort raised by the requester, and a writer failing in Abort', () => {
  it('after PrepareForBackup: every writer gets Abort; one that fails in it is FAILED_AT_ABORT', async () => {
    const journal: Journal = [];
    const bad = new ScriptedWriter({ name: 'bad', script: { abort: 'throw' }, journal });
    const good = new ScriptedWriter({ name: 'good', journal });
    const provider = new ScriptedProvider('prov', {}, journal);
    const h = harness([bad, good], provider, journal);
    await prepare(h);
    await h.bc.abortBackup('operator cancelled');
    const s = h.bc.gatherWriterStatus();
    expect(s.find((w) => w.writer === 'bad')).toMatchObject({
      state: 'FAILED_AT_ABORT',
      failure: { phase: 'abort', kind: 'NONRETRYABLE' },
      abortCount: 1,
    });
    expect(s.find((w) => w.writer === 'good')).toMatchObject({ state: 'STABLE', abortCount: 1 });
    // A second abortBackup is the same abort, not a new one.
    await h.bc.abortBackup();
    expect(good.count('abort')).toBe(1);
    expect((await h.bc.dispose()).autoAborted).toBe(false);
    expect(phasesOf(journal, 'good')).toEqual(['identify', 'prepareForBackup', 'abort']);
  });

  it('a writer that failed at Freeze and then fails in Abort keeps FAILED_AT_FREEZE; the later failure is listed', async () => {
    const journal: Journal = [];
    const bad = new ScriptedWriter({ name: 'bad', script: { freeze: 'throw', abort: 'throw' }, journal });
    const h = harness([bad], new ScriptedProvider('prov', {}, journal), journal);
    const { report } = await wholeBackup(h);
    const s = report.writers[0];
    expect(s.state).toBe('FAILED_AT_FREEZE');
    expect(s.laterFailures[0]).toMatchObject({ phase: 'abort', kind: 'NONRETRYABLE' });
  });

  it('a writer that failed at PrepareForSnapshot still receives the Abort of the set', async () => {
    const journal: Journal = [];
    const early = new ScriptedWriter({ name: 'early', script: { prepareForSnapshot: 'throw' }, journal });
    const late = new ScriptedWriter({ name: 'late', script: { freeze: 'throw' }, journal });
    const h = harness([early, late], new ScriptedProvider('prov', {}, journal), journal);
    await prepare(h);
    const report = await h.bc.doSnapshotSet();
    expect(report.abort).toMatchObject({ name: 'late', phase: 'freeze' });
    expect(early.count('abort')).toBe(1);
    expect(early.count('freeze')).toBe(0);
    expect(report.writers.find((w) => w.writer === 'early')!.state).toBe('FAILED_AT_PREPARE_SNAPSHOT');
    await h.bc.abortBackup();
    await h.bc.dispose();
  });

  it('a writer callback that throws synchronously (not async) is caught the same way', async () => {
    const journal: Journal = [];
    const w = new ScriptedWriter({ name: 'sync', journal });
    (w as unknown as { freeze: () => boolean }).freeze = () => {
      throw new Error('synchronous boom');
    };
    const h = harness([w], new ScriptedProvider('prov', {}, journal), journal);
    const { report } = await wholeBackup(h);
    expect(report.abort).toMatchObject({ by: 'writer', phase: 'freeze', kind: 'NONRETRYABLE' });
    expect(report.abort!.message).toContain('synchronous boom');
  });
});
