/**
 * The time limits: flush-and-hold (released at the limit, set failed), the Freeze→Thaw window (a writer still
 * frozen past it fails at Freeze with TIMEOUT and the set aborts, naming who overran), the provider commit
 * (a warning past the expected time, a failure past the hard limit). The requester, writers and providers
 * run on a ManualClock the test drives, so each test checks that the limit was enforced exactly at its
 * value, not at some other timeout, without waiting for it.
 */
import { describe, expect, it } from 'vitest';
import { DEFAULT_LIMITS } from '../../src/vss/index.js';
import { ManualClock } from '../helpers/clock.js';
import { ScriptedProvider, ScriptedWriter, type Journal } from './fixtures.js';
import { harness, prepare, wholeBackup } from './harness.js';

function recorder(journal: Journal, clock: ManualClock, opts: { grantAfterMs?: number; fail?: boolean } = {}) {
  const r = { holds: 0, releases: 0, releasedAt: 0, heldAt: 0 };
  const hold = async () => {
    journal.push('host.hold');
    r.heldAt = clock.now();
    if (opts.fail) throw new Error('the storage stack refused to flush');
    if (opts.grantAfterMs) await clock.sleep(opts.grantAfterMs);
    r.holds++;
    return () => {
      journal.push('host.release');
      r.releases++;
      r.releasedAt = clock.now();
    };
  };
  return { r, hold };
}

describe('flush-and-hold', () => {
  it('a commit that overruns the hold limit: writes released at the limit, set aborted, provider blamed', async () => {
    const journal: Journal = [];
    const clock = new ManualClock();
    const w = new ScriptedWriter({ name: 'vm', journal, clock });
    const provider = new ScriptedProvider('slow', { commit: 'hang' }, journal, clock);
    const { r, hold } = recorder(journal, clock);
    const h = harness([w], provider, journal, {
      clock,
      holdWrites: hold,
      limits: { holdWritesMs: 150, commitLimitMs: 5_000, freezeWindowMs: 5_000, writerCallbackMs: 1_000 },
    });
    await prepare(h);
    const t0 = clock.now();
    const report = await clock.run(h.bc.doSnapshotSet());
    const took = clock.now() - t0;
    expect(report.status).toBe('failed');
    expect(report.abort).toMatchObject({
      by: 'provider',
      name: 'slow',
      phase: 'commit',
      kind: 'TIMEOUT',
      limit: 'flush-and-hold',
    });
    expect(r.releases).toBe(1);
    expect(r.releasedAt - r.heldAt).toBe(150);
    expect(report.timings.holdMs!).toBe(150);
    expect(took).toBe(150);
    expect(w.count('thaw')).toBe(0);
    expect(w.count('abort')).toBe(1);
    expect(w.frozen).toBe(false);
    expect(report.writers[0]).toMatchObject({ state: 'STABLE', abortCount: 1 });
    expect(provider.held()).toBe(0);
    // Released before the writers heard Abort.
    expect(journal.indexOf('host.release')).toBeLessThan(journal.indexOf('writer:vm.abort'));
    await h.bc.abortBackup();
    await h.bc.dispose();
  });

  it('a hold that is granted only after the limit: the set fails, and the late hold is released at once', async () => {
    const journal: Journal = [];
    const clock = new ManualClock();
    const { r, hold } = recorder(journal, clock, { grantAfterMs: 250 });
    const h = harness([new ScriptedWriter({ name: 'vm', journal })], new ScriptedProvider('p', {}, journal), journal, {
      clock,
      holdWrites: hold,
      limits: { holdWritesMs: 100 },
    });
    await prepare(h);
    const report = await clock.run(h.bc.doSnapshotSet());
    expect(clock.now()).toBe(100);
    expect(report.abort).toMatchObject({ by: 'host', name: 'holdWrites', phase: 'hold', limit: 'flush-and-hold' });
    expect(r.holds).toBe(0);
    await clock.advance(300);
    expect(r.holds).toBe(1);
    expect(r.releases).toBe(1); // never left holding
    await h.bc.dispose();
  });

  it('a hold that fails: FLUSH_WRITES_FAILED, set aborted, nothing committed', async () => {
    const journal: Journal = [];
    const clock = new ManualClock();
    const provider = new ScriptedProvider('p', {}, journal);
    const { hold } = recorder(journal, clock, { fail: true });
    const h = harness([new ScriptedWriter({ name: 'vm', journal })], provider, journal, { clock, holdWrites: hold });
    const { report } = await clock.run(wholeBackup(h));
    expect(report.abort).toMatchObject({ by: 'host', kind: 'FLUSH_WRITES_FAILED' });
    expect(report.abort!.message).toContain('refused to flush');
    expect(provider.calls).not.toContain('commit');
  });

  it('a normal hold is released exactly once, after commit and before Thaw', async () => {
    const journal: Journal = [];
    const clock = new ManualClock();
    const { r, hold } = recorder(journal, clock);
    const h = harness([new ScriptedWriter({ name: 'vm', journal })], new ScriptedProvider('p', {}, journal), journal, {
      clock,
      holdWrites: hold,
    });
    const { report } = await clock.run(wholeBackup(h));
    expect(report.status).toBe('succeeded');
    expect(r.releases).toBe(1);
    const i = (e: string) => journal.indexOf(e);
    expect(i('writer:vm.freeze')).toBeLessThan(i('host.hold'));
    expect(i('host.hold')).toBeLessThan(i('provider:p.commit'));
    expect(i('provider:p.commit')).toBeLessThan(i('host.release'));
    expect(i('host.release')).toBeLessThan(i('writer:vm.thaw'));
  });
});

describe('the Freeze→Thaw window', () => {
  it('a slow commit past the window: frozen writers fail at Freeze with TIMEOUT, the provider is named', async () => {
    const journal: Journal = [];
    const clock = new ManualClock();
    const a = new ScriptedWriter({ name: 'a', journal, clock });
    const b = new ScriptedWriter({ name: 'b', journal, clock });
    const provider = new ScriptedProvider('p', { commit: { delayMs: 600 } }, journal, clock);
    const h = harness([a, b], provider, journal, {
      clock,
      limits: { freezeWindowMs: 200, holdWritesMs: 5_000, commitLimitMs: 5_000, writerCallbackMs: 1_000 },
    });
    await prepare(h);
    const t0 = clock.now();
    const report = await clock.run(h.bc.doSnapshotSet());
    expect(clock.now() - t0).toBe(200);
    expect(report.status).toBe('failed');
    expect(report.abort).toMatchObject({
      by: 'provider',
      name: 'p',
      phase: 'commit',
      kind: 'TIMEOUT',
      limit: 'freeze-window',
    });
    expect(report.abort!.message).toMatch(/window of 200 ms elapsed while provider p was in commit; writer\(s\) a, b/);
    for (const w of report.writers)
      expect(w).toMatchObject({
        state: 'FAILED_AT_FREEZE',
        failure: { kind: 'TIMEOUT', phase: 'freeze' },
        abortCount: 1,
      });
    expect(report.timings.freezeWindowMs!).toBe(200);
    expect(a.count('thaw') + b.count('thaw')).toBe(0);
    expect(a.frozen || b.frozen).toBe(false);
    await clock.advance(500); // the commit finishing late changes nothing
    expect(provider.calls).toContain('commit');
    expect(provider.held()).toBe(0);
    await h.bc.abortBackup();
    await h.bc.dispose();
  });

  it("each writer's own window: the short one fails, the other is only aborted", async () => {
    const journal: Journal = [];
    const clock = new ManualClock();
    const short = new ScriptedWriter({ name: 'short', freezeWindowMs: 120, journal, clock });
    const long = new ScriptedWriter({ name: 'long', journal, clock });
    const provider = new ScriptedProvider('p', { commit: { delayMs: 400 } }, journal, clock);
    const h = harness([short, long], provider, journal, {
      clock,
      limits: { freezeWindowMs: 5_000, holdWritesMs: 5_000, commitLimitMs: 5_000 },
    });
    await prepare(h);
    const report = await clock.run(h.bc.doSnapshotSet());
    expect(clock.now()).toBe(120);
    expect(report.abort).toMatchObject({ limit: 'freeze-window', phase: 'commit' });
    expect(report.abort!.message).toContain('window of 120 ms');
    expect(report.writers.find((w) => w.writer === 'short')).toMatchObject({ state: 'FAILED_AT_FREEZE' });
    expect(report.writers.find((w) => w.writer === 'long')).toMatchObject({ state: 'STABLE', abortCount: 1 });
    expect(report.writers.find((w) => w.writer === 'long')!.failure).toBeUndefined();
    await h.bc.dispose();
  });

  it('a writer whose Freeze itself runs past the window is the one named', async () => {
    const journal: Journal = [];
    const clock = new ManualClock();
    const slow = new ScriptedWriter({ name: 'slow', script: { freeze: 'hang' }, journal });
    const fast = new ScriptedWriter({ name: 'fast', journal });
    const h = harness([slow, fast], new ScriptedProvider('p', {}, journal), journal, {
      clock,
      limits: { freezeWindowMs: 150, writerCallbackMs: 5_000 },
    });
    await prepare(h);
    const t0 = clock.now();
    const report = await clock.run(h.bc.doSnapshotSet());
    expect(clock.now() - t0).toBe(150);
    expect(report.abort).toMatchObject({
      by: 'writer',
      name: 'slow',
      phase: 'freeze',
      kind: 'TIMEOUT',
      limit: 'freeze-window',
    });
    expect(report.writers.map((w) => w.state)).toEqual(['FAILED_AT_FREEZE', 'FAILED_AT_FREEZE']);
    expect(fast.count('abort')).toBe(1);
    await h.bc.dispose();
  });

  it('a writer that fails Freeze at once aborts the others without waiting for their Freeze', async () => {
    const journal: Journal = [];
    const clock = new ManualClock();
    const bad = new ScriptedWriter({ name: 'bad', script: { freeze: 'throw' }, journal, clock });
    const slow = new ScriptedWriter({ name: 'slow', script: { freeze: { delayMs: 1_000 } }, journal, clock });
    const h = harness([bad, slow], new ScriptedProvider('p', {}, journal), journal, {
      clock,
      limits: { writerCallbackMs: 5_000 },
    });
    await prepare(h);
    const t0 = clock.now();
    const report = await clock.run(h.bc.doSnapshotSet());
    expect(clock.now() - t0).toBe(0); // not a moment of slow's 1 s Freeze
    expect(report.abort).toMatchObject({ name: 'bad', phase: 'freeze' });
    expect(report.writers.find((w) => w.writer === 'slow')).toMatchObject({ state: 'STABLE', abortCount: 1 });
    expect(slow.contexts.find((c) => c.phase === 'freeze')!.signal.aborted).toBe(true);
    await h.bc.dispose();
  });
});

describe('the provider commit', () => {
  it('slower than expected: a warning, the snapshot stands', async () => {
    const journal: Journal = [];
    const clock = new ManualClock();
    const h = harness(
      [new ScriptedWriter({ name: 'vm', journal })],
      new ScriptedProvider('p', { commit: { delayMs: 60 } }, journal, clock),
      journal,
      { clock, limits: { commitWarnMs: 20, commitLimitMs: 2_000 } },
    );
    const { report } = await clock.run(wholeBackup(h));
    expect(report.status).toBe('succeeded');
    expect(report.timings.commitMs!).toBe(60);
    expect(report.warnings).toEqual([expect.stringMatching(/commit took \d+(\.\d)? ms, over the expected 20 ms/)]);
    expect(report.warnings[0]).toContain('commit took 60 ms');
  });

  it('past the hard limit: TIMEOUT at commit, limit "commit", set aborted and released', async () => {
    const journal: Journal = [];
    const clock = new ManualClock();
    const provider = new ScriptedProvider('p', { commit: 'hang' }, journal);
    const h = harness([new ScriptedWriter({ name: 'vm', journal })], provider, journal, {
      clock,
      limits: { commitLimitMs: 100, holdWritesMs: 5_000 },
    });
    const { report } = await clock.run(wholeBackup(h));
    expect(report.timings.commitMs!).toBe(100);
    expect(report.abort).toMatchObject({ by: 'provider', phase: 'commit', kind: 'TIMEOUT', limit: 'commit' });
    expect(report.abort!.message).toContain('took more than 100 ms');
    expect(provider.held()).toBe(0);
  });
});

describe('the production limits, on a clock that does not wait for them', () => {
  it('a 1.5 s commit warns (over 1 s) and stands; a hung one fails at 10 s', async () => {
    const journal: Journal = [];
    const clock = new ManualClock();
    const slow = harness(
      [new ScriptedWriter({ name: 'vm', journal })],
      new ScriptedProvider('p', { commit: { delayMs: 1_500 } }, journal, clock),
      journal,
      { clock, limits: DEFAULT_LIMITS },
    );
    const { report } = await clock.run(wholeBackup(slow));
    expect(report.status).toBe('succeeded');
    expect(report.timings.commitMs!).toBe(1_500);
    expect(report.warnings).toEqual([expect.stringContaining('commit took 1500 ms, over the expected 1000 ms')]);

    const hung = harness(
      [new ScriptedWriter({ name: 'vm', journal })],
      new ScriptedProvider('q', { commit: 'hang' }, journal),
      journal,
      { clock, limits: DEFAULT_LIMITS },
    );
    const t0 = clock.now();
    const r = await clock.run(wholeBackup(hung));
    expect(clock.now() - t0).toBe(DEFAULT_LIMITS.commitLimitMs);
    expect(r.report.abort).toMatchObject({
      by: 'provider',
      name: 'q',
      phase: 'commit',
      kind: 'TIMEOUT',
      limit: 'commit',
    });
  });
});

describe('the requester aborts while DoSnapshotSet runs', () => {
  it('stops at once, the cause is the requester, writers get Abort', async () => {
    const journal: Journal = [];
    const clock = new ManualClock();
    const w = new ScriptedWriter({ name: 'vm', journal, clock });
    const provider = new ScriptedProvider('p', { commit: { delayMs: 2_000 } }, journal, clock);
    const h = harness([w], provider, journal, {
      clock,
      limits: { holdWritesMs: 5_000, commitLimitMs: 5_000, freezeWindowMs: 5_000 },
    });
    await prepare(h);
    const running = h.bc.doSnapshotSet();
    await clock.advance(50);
    expect(provider.calls).toContain('commit'); // the abort lands while the commit runs
    const t0 = clock.now();
    await clock.run(h.bc.abortBackup('operator pressed cancel'));
    expect(clock.now() - t0).toBe(0); // not waiting for the commit's remaining 1950 ms
    const report = await clock.run(running);
    expect(report.abort).toMatchObject({
      by: 'requester',
      kind: 'REQUESTER_ABORT',
      message: 'operator pressed cancel',
    });
    expect(w.count('abort')).toBe(2);
    expect(w.frozen).toBe(false);
    expect(provider.held()).toBe(0);
    expect((await h.bc.dispose()).autoAborted).toBe(false);
  });
});
