/** Shared set-up for the VSS tests: a backup with scripted writers and providers, driven to a point. */
import {
  BackupComponents,
  type BackupComponentsOptions,
  type ComponentRef,
  type SnapshotSetReport,
  type VssLimits,
} from '../../src/vss/index.js';
import { ScriptedProvider, ScriptedWriter, type Journal } from './fixtures.js';

/** Small limits: a hang costs a callback limit, never more. */
export const FAST: Partial<VssLimits> = {
  freezeWindowMs: 2_000,
  holdWritesMs: 2_000,
  commitWarnMs: 1_000,
  commitLimitMs: 2_000,
  writerCallbackMs: 120,
  providerCallMs: 120,
};

export interface Harness {
  bc: BackupComponents;
  journal: Journal;
  writers: ScriptedWriter[];
  provider: ScriptedProvider;
}

export function harness(
  writers: ScriptedWriter[],
  provider: ScriptedProvider,
  journal: Journal,
  opts: Omit<BackupComponentsOptions, 'writers' | 'providers'> = {},
): Harness {
  const bc = new BackupComponents({ limits: FAST, ...opts, writers, providers: [provider] });
  return { bc, journal, writers, provider };
}

/** initialize → setBackupState → gather → (select) → start set + add files → PrepareForBackup. */
export async function prepare(
  h: Harness,
  opts: { select?: ComponentRef[]; files?: string[]; type?: 'full' | 'incremental' | 'copy' } = {},
): Promise<void> {
  h.bc.initializeForBackup();
  h.bc.setBackupState({ type: opts.type ?? 'full', selectComponents: opts.select !== undefined });
  await h.bc.gatherWriterMetadata();
  for (const c of opts.select ?? []) h.bc.addComponent(c);
  h.bc.startSnapshotSet();
  await h.bc.addToSnapshotSet(opts.files ?? ['/vss-test/a.vhdx', '/vss-test/b.vhdx']);
  await h.bc.prepareForBackup();
}

/** The whole backup: returns the DoSnapshotSet report; completes or aborts, then disposes. */
export async function wholeBackup(
  h: Harness,
  opts: Parameters<typeof prepare>[1] = {},
): Promise<{ report: SnapshotSetReport; autoAborted: boolean }> {
  await prepare(h, opts);
  const report = await h.bc.doSnapshotSet();
  if (report.status === 'failed') await h.bc.abortBackup();
  else {
    for (const c of report.components) h.bc.setBackupSucceeded(c, c.status === 'ok');
    await h.bc.backupComplete();
  }
  const d = await h.bc.dispose();
  return { report, autoAborted: d.autoAborted };
}

/** The phases a writer saw, in order, from the journal. */
export function phasesOf(journal: Journal, writer: string): string[] {
  const p = `writer:${writer}.`;
  return journal.filter((e) => e.startsWith(p)).map((e) => e.slice(p.length));
}
