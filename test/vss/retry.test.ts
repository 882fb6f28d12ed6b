/**
 * runBackup: retries of retryable failures (a new BackupComponents per attempt), no retry of the others,
 * partial failures per component carried to the copy and to BackupComplete, a failed copy aborting.
 */
import { describe, expect, it } from 'vitest';
import { BackupComponents, runBackup, type RunBackupOptions } from '../../src/vss/index.js';
import { ScriptedProvider, ScriptedWriter, type Behaviour, type Journal } from './fixtures.js';
import { FAST } from './harness.js';
import { ManualClock } from '../helpers/clock.js';

function setup(
  script: ConstructorParameters<typeof ScriptedWriter>[0]['script'],
  extra: Partial<RunBackupOptions> = {},
) {
  const journal: Journal = [];
  // Every wait (callback limits, the pause between attempts) is on this clock, which s.run drives.
  const clock = new ManualClock();
  const w = new ScriptedWriter({ name: 'db', script, journal, clock });
  const other = new ScriptedWriter({ name: 'web', journal, clock });
  const provider = new ScriptedProvider('P', {}, journal, clock);
  let created = 0;
  const opts: RunBackupOptions = {
    create: () => {
      created++;
      return new BackupComponents({ writers: [w, other], providers: [provider], limits: FAST, clock });
    },
    clock,
    type: 'full',
    volumes: [{ files: ['/vms/db.vhdx'] }, { files: ['/vms/web.vhdx'], provider: 'P' }],
    retryDelayMs: 0,
    ...extra,
  };
  /** runBackup, with the clock moved on whenever everything waits on it. */
  const run = (o: RunBackupOptions) => clock.run(runBackup(o));
  return { journal, w, other, provider, opts, clock, run, created: () => created };
}

const RETRYABLE_FREEZE: Behaviour = { fail: 'RETRYABLE', fatal: true };

describe('runBackup retries', () => {
  it('a RETRYABLE Freeze failure twice, then success: three attempts, three objects, success', async () => {
    const s = setup({ freeze: [RETRYABLE_FREEZE, RETRYABLE_FREEZE, 'ok'] }, { retries: 3 });
    const seen: number[] = [];
    const r = await s.run({ ...s.opts, onAttempt: (a) => seen.push(a.attempt) });
    expect(r.status).toBe('succeeded');
    expect(r.attempts.map((a) => [a.attempt, a.retried, a.status, a.stoppedAt])).toEqual([
      [1, true, 'failed', 'doSnapshotSet'],
      [2, true, 'failed', 'doSnapshotSet'],
      [3, false, 'succeeded', 'backupComplete'],
    ]);
    expect(r.attempts[0].reasons[0]).toMatch(/RETRYABLE in freeze/);
    expect(seen).toEqual([1, 2, 3]);
    expect(s.created()).toBe(3);
    expect(s.w.count('abort')).toBe(4); // each failed attempt: the set's Abort, then the requester's
    expect(s.w.count('backupComplete')).toBe(1);
    expect(r.attempts.every((a) => !a.autoAborted)).toBe(true);
    expect(s.provider.held()).toBe(0);
    expect(r.writerStatus.map((w) => w.state)).toEqual(['STABLE', 'STABLE']);
  });

  it('retries run out: the last attempt is reported as it is', async () => {
    const s = setup({ freeze: RETRYABLE_FREEZE }, { retries: 2 });
    const r = await s.run(s.opts);
    expect(r.status).toBe('failed');
    expect(r.attempts.length).toBe(3);
    expect(r.attempts.at(-1)!.retried).toBe(false);
    expect(r.report!.abort).toMatchObject({ by: 'writer', name: 'db', kind: 'RETRYABLE' });
    expect(s.created()).toBe(3);
  });

  it('NONRETRYABLE is not retried', async () => {
    const s = setup({ freeze: { fail: 'NONRETRYABLE', fatal: true } });
    const r = await s.run(s.opts);
    expect(r.status).toBe('failed');
    expect(r.attempts.length).toBe(1);
    expect(s.created()).toBe(1);
  });

  it('retryOn decides: a TIMEOUT is retried only when asked', async () => {
    const a = setup({ freeze: ['hang', 'ok'] });
    expect((await a.run(a.opts)).attempts.length).toBe(1);
    const b = setup({ freeze: ['hang', 'ok'] }, { retryOn: ['RETRYABLE', 'TIMEOUT'] });
    const r = await b.run(b.opts);
    expect(r.status).toBe('succeeded');
    expect(r.attempts.length).toBe(2);
  });

  it('retryable failures in Identify and in PrepareForBackup are retried before any snapshot', async () => {
    const a = setup({ identify: [RETRYABLE_FREEZE, 'ok'] });
    const ra = await a.run(a.opts);
    expect(ra.status).toBe('succeeded');
    expect(ra.attempts.map((x) => x.stoppedAt)).toEqual(['gatherWriterMetadata', 'backupComplete']);
    const b = setup({ prepareForBackup: [RETRYABLE_FREEZE, 'ok'] });
    const rb = await b.run(b.opts);
    expect(rb.status).toBe('succeeded');
    expect(rb.attempts.map((x) => x.stoppedAt)).toEqual(['prepareForBackup', 'backupComplete']);
    expect(b.w.count('abort')).toBe(1);
    expect(b.provider.calls.filter((c) => c === 'commit').length).toBe(1);
  });

  it('waits retryDelayMs between attempts and stops waiting on its signal', async () => {
    const s = setup({ freeze: RETRYABLE_FREEZE }, { retries: 1, retryDelayMs: 150 });
    const t0 = s.clock.now();
    await s.run(s.opts);
    expect(s.clock.now() - t0).toBe(150);
    const c = setup({ freeze: RETRYABLE_FREEZE }, { retries: 1, retryDelayMs: 60_000 });
    const ac = new AbortController();
    c.clock.setTimeout(() => ac.abort(), 50);
    await expect(c.run({ ...c.opts, signal: ac.signal })).rejects.toMatchObject({ name: 'AbortError' });
    expect(c.clock.now()).toBe(50);
    expect(c.created()).toBe(1);
  });
});

describe('partial failures per component', () => {
  it('one component fails non-fatally: the others are copied, the writer hears which succeeded', async () => {
    const s = setup({
      prepareForSnapshot: { components: [{ logicalPath: 'db', name: 'logs', kind: 'INCONSISTENTSNAPSHOT' }] },
    });
    const copied: string[] = [];
    const r = await s.run({
      ...s.opts,
      components: [
        { writer: 'db', logicalPath: 'db', name: 'data' },
        { writer: 'db', logicalPath: 'db', name: 'logs' },
        { writer: 'web', logicalPath: 'web', name: 'data' },
      ],
      copy: async (session) => {
        for (const c of session.components) copied.push(`${c.writer}:${c.name}`);
        expect(session.snapshotOf('/vms/web.vhdx')!.info.provider).toBe('P');
      },
    });
    expect(r.status).toBe('partial');
    expect(copied).toEqual(['db:data', 'db:config', 'web:data', 'web:config']);
    const logs = r.components.find((c) => c.writer === 'db' && c.name === 'logs')!;
    expect(logs).toMatchObject({
      status: 'failed',
      failure: { kind: 'INCONSISTENTSNAPSHOT', phase: 'prepareForSnapshot' },
      backupSucceeded: false,
    });
    expect(r.report!.writers.find((w) => w.writer === 'db')!.failure).toMatchObject({
      kind: 'PARTIAL_FAILURE',
      fatal: false,
    });
    const complete = s.w.contexts.find((c) => c.phase === 'backupComplete')!;
    expect(complete.components.map((c) => [c.name, c.backupSucceeded])).toEqual([
      ['data', true],
      ['logs', false],
      ['config', true],
    ]);
    expect(s.w.count('abort')).toBe(0);
  });

  it('a RETRYABLE component failure is retried', async () => {
    const s = setup({
      postSnapshot: [{ components: [{ logicalPath: 'db', name: 'data', kind: 'RETRYABLE' }] }, 'ok'],
    });
    const r = await s.run(s.opts);
    expect(r.status).toBe('succeeded');
    expect(r.attempts.length).toBe(2);
  });

  it('a component of a writer that cannot identify is reported failed, the rest goes on', async () => {
    const s = setup({ identify: 'throw' });
    const r = await s.run({
      ...s.opts,
      components: [
        { writer: 'db', name: 'data', logicalPath: 'db' },
        { writer: 'web', name: 'data', logicalPath: 'web' },
      ],
    });
    expect(r.status).toBe('partial');
    expect(r.components.find((c) => c.writer === 'db')).toMatchObject({
      status: 'failed',
      failure: { phase: 'identify', kind: 'NONRETRYABLE' },
    });
    expect(r.components.filter((c) => c.writer === 'web').every((c) => c.status === 'ok')).toBe(true);
  });

  it('the requester marks a copy failed: partial, and the writer is told', async () => {
    const s = setup({});
    const r = await s.run({
      ...s.opts,
      copy: async (session) =>
        session.markComponent({ writer: 'web', logicalPath: 'web', name: 'logs' }, false, 'disk full'),
    });
    expect(r.status).toBe('partial');
    const ctx = s.other.contexts.find((c) => c.phase === 'backupComplete')!;
    expect(ctx.components.find((c) => c.name === 'logs')).toMatchObject({
      backupSucceeded: false,
      backupMessage: 'disk full',
    });
  });

  it('a copy that throws aborts the backup (writers hear Abort, snapshots released) and is not retried', async () => {
    const s = setup({});
    const r = await s.run({
      ...s.opts,
      copy: async () => {
        throw new Error('repository unreachable');
      },
    });
    expect(r.status).toBe('failed');
    expect(r.copyError).toBe('repository unreachable');
    expect(r.attempts.length).toBe(1);
    expect(r.report!.abort).toMatchObject({
      by: 'requester',
      message: expect.stringContaining('repository unreachable'),
    });
    expect(s.w.count('abort')).toBe(1);
    expect(s.w.count('backupComplete')).toBe(0);
    expect(s.provider.held()).toBe(0);
  });

  it('a caller mistake (unknown component) throws, after cleaning up', async () => {
    const s = setup({});
    await expect(s.run({ ...s.opts, components: [{ writer: 'db', name: 'nope' }] })).rejects.toMatchObject({
      code: 'NOT_FOUND',
    });
    // The writer is free for the next backup.
    expect((await s.run(s.opts)).status).toBe('succeeded');
  });
});
