/**
 * Seeded random backups against an independent model of the rules (HYPERV-BACKUP-MODEL.md §2): three writers
 * and a provider get a random behaviour in every phase (succeed, fail fatally or not, fail a component, throw,
 * hang, return garbage), in component or non-component mode. The model predicts the status, who raised Abort
 * and where, each writer's final state, how often it heard each callback; the framework must agree, never
 * throw, and always end with nothing held and nobody frozen.
 *
 * TIDEMARK_VSS_CASES=2000 TIDEMARK_VSS_SEED=... for long runs.
 */
import { describe, expect, it } from 'vitest';
import type { WriterFailureKind, WriterPhase, WriterState } from '../../src/vss/index.js';
import { rng, seedFrom } from '../helpers/random.js';
import { ScriptedProvider, ScriptedWriter, type Behaviour, type Journal, type ProviderBehaviour } from './fixtures.js';
import { harness } from './harness.js';

const SEED = seedFrom('TIDEMARK_VSS_SEED', 0x5eed);
const CASES = Number(process.env.TIDEMARK_VSS_CASES ?? 60);
const LIMIT = 60; // ms: what a hang costs

const PHASES: WriterPhase[] = [
  'identify',
  'prepareForBackup',
  'prepareForSnapshot',
  'freeze',
  'thaw',
  'postSnapshot',
  'backupComplete',
  'abort',
];
const P_PHASES = ['beginPrepare', 'endPrepare', 'preCommit', 'commit', 'postCommit'] as const;
type PPhase = (typeof P_PHASES)[number];
const KINDS: WriterFailureKind[] = ['RETRYABLE', 'NONRETRYABLE', 'OUTOFRESOURCES', 'INCONSISTENTSNAPSHOT'];

type R = ReturnType<typeof rng>;

function pickBehaviour(r: R, phase: WriterPhase): Behaviour {
  const x = r.next();
  if (x < 0.72) return 'ok';
  if (x < 0.77) return 'throw';
  if (x < 0.81) return 'false';
  if (x < 0.83) return 'hang';
  if (x < 0.85) return 'not-boolean';
  if (x < 0.92) return { fail: r.pick(KINDS), fatal: true };
  if (x < 0.97 || phase === 'identify') return { fail: r.pick(KINDS), fatal: false };
  return { components: [{ name: 'data', logicalPath: '', kind: r.pick(KINDS) }], fatal: false };
}

function isFatal(b: Behaviour): boolean {
  if (typeof b === 'string') return b !== 'ok';
  if ('delayMs' in b) return false;
  return !!b.fatal;
}
function failureKind(b: Behaviour): WriterFailureKind {
  if (b === 'hang') return 'TIMEOUT';
  if (typeof b === 'string') return 'NONRETRYABLE';
  if ('fail' in b) return b.fail;
  return 'PARTIAL_FAILURE';
}
const hasFailure = (b: Behaviour) => b !== 'ok';

const FAILED: Record<WriterPhase, WriterState> = {
  identify: 'FAILED_AT_IDENTIFY',
  prepareForBackup: 'FAILED_AT_PREPARE_BACKUP',
  prepareForSnapshot: 'FAILED_AT_PREPARE_SNAPSHOT',
  freeze: 'FAILED_AT_FREEZE',
  thaw: 'FAILED_AT_THAW',
  postSnapshot: 'FAILED_AT_POST_SNAPSHOT',
  backupComplete: 'FAILED_AT_BACKUP_COMPLETE',
  abort: 'FAILED_AT_ABORT',
};

interface Case {
  componentMode: boolean;
  selected: boolean[];
  scripts: Record<WriterPhase, Behaviour>[];
  provider: Partial<Record<PPhase, ProviderBehaviour>>;
}

function makeCase(r: R): Case {
  const scripts = [0, 1, 2].map(() => {
    const s = {} as Record<WriterPhase, Behaviour>;
    for (const p of PHASES) s[p] = pickBehaviour(r, p);
    return s;
  });
  // At most one writer fails Freeze, and then the others succeed in it (likewise Thaw): when two fail at the
  // same moment, which one the requester hears first is a race the model does not try to predict.
  for (const phase of ['freeze', 'thaw'] as const) {
    const fatal = scripts.map((s, i) => (hasFailure(s[phase]) ? i : -1)).filter((i) => i >= 0);
    if (fatal.some((i) => isFatal(scripts[i][phase])))
      scripts.forEach((s, i) => i !== fatal.find((j) => isFatal(scripts[j][phase])) && (s[phase] = 'ok'));
  }
  const provider: Case['provider'] = {};
  for (const p of P_PHASES) {
    const x = r.next();
    if (x < 0.03) provider[p] = 'throw';
    else if (x < 0.05) provider[p] = 'veto';
    else if (x < 0.06) provider[p] = 'hang';
  }
  return { componentMode: r.next() < 0.5, selected: [0, 1, 2].map(() => r.next() < 0.6), scripts, provider };
}

interface Expect {
  status: 'succeeded' | 'partial' | 'failed';
  finalStatus: 'succeeded' | 'partial' | 'failed';
  abort?: { by: 'writer' | 'provider'; name: string; phase: string };
  states: WriterState[];
  calls: Partial<Record<WriterPhase, number>>[];
}

/** The rules, written again from the model's text, independently of src/vss. */
function model(c: Case): Expect {
  const n = c.scripts.length;
  const failedAt: (WriterPhase | undefined)[] = Array(n).fill(undefined);
  const anyFailure = Array(n).fill(false);
  const calls: Partial<Record<WriterPhase, number>>[] = c.scripts.map(() => ({}));
  const call = (i: number, p: WriterPhase) => {
    calls[i][p] = (calls[i][p] ?? 0) + 1;
    const b = c.scripts[i][p];
    if (hasFailure(b)) anyFailure[i] = true;
    if (isFatal(b) && !failedAt[i]) failedAt[i] = p;
    return !isFatal(b);
  };
  const identified: boolean[] = [];
  for (let i = 0; i < n; i++) identified[i] = call(i, 'identify');
  const participating = c.scripts.map((_, i) => (c.componentMode ? c.selected[i] && identified[i] : true));
  const active = () => [...Array(n).keys()].filter((i) => participating[i] && !failedAt[i]);
  const prepared = participating.map((p, i) => p && identified[i]);
  for (const i of active()) call(i, 'prepareForBackup');
  for (const i of active()) call(i, 'prepareForSnapshot');
  let abort: Expect['abort'];
  const provider = (p: PPhase) => {
    if (!abort && c.provider[p]) abort = { by: 'provider', name: 'P', phase: p };
    return !abort;
  };
  const writers = (p: 'freeze' | 'thaw') => {
    for (const i of active()) if (!call(i, p) && !abort) abort = { by: 'writer', name: `w${i}`, phase: p };
    return !abort;
  };
  const ok =
    provider('beginPrepare') &&
    provider('endPrepare') &&
    writers('freeze') &&
    provider('preCommit') &&
    provider('commit') &&
    writers('thaw') &&
    provider('postCommit');
  if (ok) for (const i of active()) call(i, 'postSnapshot');
  let status: Expect['status'];
  let finalStatus: Expect['finalStatus'];
  if (!ok) {
    status = finalStatus = 'failed';
    for (let round = 0; round < 2; round++) for (let i = 0; i < n; i++) if (prepared[i]) call(i, 'abort');
  } else {
    status = [...Array(n).keys()].some((i) => participating[i] && anyFailure[i]) ? 'partial' : 'succeeded';
    for (const i of active()) call(i, 'backupComplete');
    finalStatus = [...Array(n).keys()].some((i) => participating[i] && anyFailure[i]) ? 'partial' : 'succeeded';
  }
  const states = failedAt.map((p) => (p ? FAILED[p] : 'STABLE'));
  return { status, finalStatus, ...(abort ? { abort } : {}), states, calls };
}

describe(`random backups against the model (seed ${SEED}, ${CASES} cases)`, () => {
  it('agree on status, abort cause, states and callbacks; nothing held, nobody frozen', async () => {
    const r = rng(SEED);
    const seen = new Map<string, number>();
    const note = (what: string) => seen.set(what, (seen.get(what) ?? 0) + 1);
    for (let k = 0; k < CASES; k++) {
      const c = makeCase(r);
      const want = model(c);
      const journal: Journal = [];
      const components = [
        { name: 'data', selectable: true, fileSets: [] },
        { name: 'config', selectable: false, fileSets: [] },
      ];
      const writers = c.scripts.map((script, i) => new ScriptedWriter({ name: `w${i}`, script, journal, components }));
      const provider = new ScriptedProvider('P', c.provider, journal);
      const h = harness(writers, provider, journal, {
        limits: {
          writerCallbackMs: LIMIT,
          providerCallMs: LIMIT,
          commitLimitMs: LIMIT,
          freezeWindowMs: 5_000,
          holdWritesMs: 5_000,
        },
      });
      const where = `case ${k} (seed ${SEED}): ${JSON.stringify(c)}`;
      const bc = h.bc;
      bc.initializeForBackup();
      bc.setBackupState({ type: 'full', selectComponents: c.componentMode });
      const meta = await bc.gatherWriterMetadata();
      if (c.componentMode)
        meta.forEach((m, i) => c.selected[i] && m.metadata && bc.addComponent({ writer: m.writer, name: 'data' }));
      bc.startSnapshotSet();
      await bc.addToSnapshotSet(['/v/disk.vhdx']);
      await bc.prepareForBackup();
      const report = await bc.doSnapshotSet();
      expect(report.status, where).toBe(want.status);
      note(report.status);
      if (report.abort) note(`abort by ${report.abort.by} at ${report.abort.phase}`);
      if (want.abort) expect(report.abort, where).toMatchObject(want.abort);
      else expect(report.abort, where).toBeUndefined();
      if (report.status === 'failed') await bc.abortBackup();
      else {
        for (const comp of report.components) bc.setBackupSucceeded(comp, comp.status === 'ok');
        await bc.backupComplete();
        expect(bc.report()!.status, where).toBe(want.finalStatus);
      }
      const d = await bc.dispose();
      expect(d.autoAborted, where).toBe(false);
      const status = bc.gatherWriterStatus();
      expect(
        status.map((s) => s.state),
        where,
      ).toEqual(want.states);
      // The fatal failure is recorded with the phase and the kind the behaviour implies.
      status.forEach((s, i) => {
        const phase = Object.keys(FAILED).find((p) => FAILED[p as WriterPhase] === s.state) as WriterPhase | undefined;
        if (!phase) return;
        const f = [s.failure, ...s.laterFailures].find((x) => x?.fatal && x.phase === phase);
        expect(f?.kind, `${where}: w${i}`).toBe(failureKind(c.scripts[i][phase]));
      });
      for (let i = 0; i < writers.length; i++) {
        for (const p of PHASES) expect(writers[i].count(p), `${where}: w${i}.${p}`).toBe(want.calls[i][p] ?? 0);
        expect(writers[i].frozen, where).toBe(false);
      }
      expect(provider.held(), where).toBe(0);
      for (const st of want.states) note(st);
    }
    console.log(`vss model, seed ${SEED}:`, Object.fromEntries([...seen].sort()));
    // The sample must exercise every outcome, or it proves little.
    for (const must of ['succeeded', 'partial', 'failed', 'FAILED_AT_FREEZE', 'FAILED_AT_PREPARE_SNAPSHOT'])
      expect(seen.get(must) ?? 0, `no case ended ${must}`).toBeGreaterThan(0);
  });
});
