/**
 * `tidemark backup` and `tidemark restore`: the backup application on the command line. A backup is a client
 * of a running host (--store or TIDEMARK_HOST) writing a repository (--repo or TIDEMARK_REPO).
 */
import { Command } from 'commander';
import { HostClient } from '../api/client.js';
import { formatRate, parseAuditMode, parseAuditSeed, parseAuditTime, type AuditResult } from '../backup/audit.js';
import { runBackupSet, type BackupSetSummary, type Flow } from '../backup/backup-set.js';
import { restorePoint, restoreRegistered, type RestoreSummary } from '../backup/restore.js';
import { TidemarkError } from '../errors.js';
import { formatSize } from '../util/size.js';
import { EXIT, printJson, println } from './output.js';
import { progressBars } from './progress.js';
import { withRepo, withRepoOptions, type RepoOpts } from './repo.js';

type Run = (fn: () => Promise<number | void>) => Promise<void>;

export function backupCommand(run: Run): Command {
  return withRepoOptions(
    new Command('backup')
      .description(
        'back up VMs: checkpoints, ONE storage snapshot, reference points, changed blocks into the repository',
      )
      .argument('<vm...>', 'the VMs of the backup set')
      .option('--store <dir>', "the host's store (or TIDEMARK_HOST)")
      .option('--flow <flow>', '2016 (one snapshot for the set) | per-vm | 2012r2 | 2008r2 | no-snapshot', '2016')
      .option('--batch <n>', 'VMs per storage snapshot in the per-vm, 2012r2 and 2008r2 flows', '1')
      .option('--vm-parallel <n>', 'VMs read at once in the data phase', '4')
      .option('--consistency <c>', 'app (fall back to crash) | crash | app-required', 'app')
      .option('--provider <p>', 'storage snapshot provider: cow | reflink', 'cow')
      .option(
        '--audit <rate>',
        "tracking audit of incrementals: a fraction (0.01) or percentage (1%) of each disk's chunks (at least 16) | off | full",
        '1%',
      )
      .option(
        '--audit-time <seconds>',
        'time budget of a sampled audit per disk after the changed chunks are read (default: 10% of their read time, at least 2 s)',
      )
      .option('--audit-seed <n>', 'seed of the audit samples (default: random; a run logs and records its seed)')
      .option('--wait [seconds]', 'wait for VMs another run holds (BUSY at once without it; no value: until free)')
      .option(
        '--nbd-tls-dir <dir>',
        'client credentials for a host whose NBD requires TLS: ca-cert.pem, client-cert.pem, client-key.pem (or TIDEMARK_NBD_TLS_DIR)',
      )
      .option('--json', 'print the summary as JSON'),
  ).action((vms: string[], o: RepoOpts & Record<string, string | boolean | undefined>) =>
    run(async () => {
      const flow = o.flow as Flow;
      if (!['2016', 'per-vm', '2012r2', '2008r2', 'no-snapshot'].includes(flow)) {
        throw new TidemarkError(
          'INVALID_ARGUMENT',
          `--flow must be 2016, per-vm, 2012r2, 2008r2 or no-snapshot, not ${flow}`,
        );
      }
      if (!['app', 'crash', 'app-required'].includes(o.consistency as string)) {
        throw new TidemarkError('INVALID_ARGUMENT', `--consistency must be app, crash or app-required`);
      }
      const audit = parseAuditMode(o.audit as string);
      const auditTimeMs = o.auditTime === undefined ? undefined : parseAuditTime(o.auditTime as string);
      if (auditTimeMs !== undefined && audit.kind !== 'sample') {
        throw new TidemarkError('INVALID_ARGUMENT', `--audit-time bounds a sampled audit; --audit ${o.audit} has none`);
      }
      const auditSeed = o.auditSeed === undefined ? undefined : parseAuditSeed(o.auditSeed as string);
      const wait = parseWait(o.wait);
      const host = await HostClient.connect({ store: o.store as string | undefined });
      const bars = progressBars(!o.json && process.stderr.isTTY === true);
      const summary = await withRepo(
        o,
        (repo) =>
          runBackupSet({
            host,
            repo,
            vms,
            flow,
            batch: Number(o.batch),
            vmParallel: parsePositive(o.vmParallel as string, '--vm-parallel'),
            consistency: o.consistency as 'app' | 'crash' | 'app-required',
            provider: o.provider as 'cow' | 'reflink',
            audit,
            auditTimeMs,
            auditSeed,
            wait,
            nbdTlsDir: (o.nbdTlsDir as string | undefined) ?? process.env.TIDEMARK_NBD_TLS_DIR,
            command: `tidemark backup ${vms.join(' ')}`,
            events: {
              log: (line) => (process.stderr.isTTY ? undefined : process.stderr.write(`${line}\n`)),
              progress: (vm, slot, done, total) => bars.update(`${vm} ${slot}`, done, total),
            },
          }),
        4,
      ).finally(() => bars.stop());
      if (o.json) printJson(summary);
      else printBackupSummary(summary);
      return summary.ok ? EXIT.OK : EXIT.FAILED;
    }),
  );
}

function parsePositive(v: string, what: string): number {
  const n = Number(v);
  if (!/^\d+$/.test(v) || !(n >= 1))
    throw new TidemarkError('INVALID_ARGUMENT', `${what} takes a whole number ≥ 1, not "${v}"`);
  return n;
}

/** `--wait` alone: until the VMs are free; `--wait N`: at most N seconds. */
function parseWait(v: string | boolean | undefined): number | undefined {
  if (v === undefined || v === false) return undefined;
  if (v === true) return Infinity;
  const n = Number(v);
  if (!/^\d+(\.\d+)?$/.test(v) || !Number.isFinite(n)) {
    throw new TidemarkError('INVALID_ARGUMENT', `--wait takes a number of seconds, not "${v}"`);
  }
  return n;
}

export function printBackupSummary(s: BackupSetSummary): void {
  println(
    `${s.ok ? 'backup complete' : 'backup FAILED'}: restore point ${s.pointId ?? '(none)'}, flow ${s.flow}, ${s.snapshots} storage snapshot(s), ${(s.durationMs / 1000).toFixed(1)} s`,
  );
  for (const v of s.vms) {
    println(
      `  ${v.name}: ${v.status}${v.error ? ` (${v.error})` : ''}; ${v.consistency ?? '-'}-consistent; read ${formatSize(v.bytesRead)}, new ${formatSize(v.bytesNew)}, stored ${formatSize(v.bytesStored)}; freeze ${ms(v.freezeWindowMs)}, I/O pause ${ms(v.ioPauseMs)}${v.autoRecoveryMs !== null ? `; auto-recovery ${ms(v.autoRecoveryMs)}` : ''}`,
    );
    if (v.autoRecovery) println(`    auto-recovery: ${v.autoRecovery}`);
    for (const g of v.guidNames ?? [])
      println(`    ${g.slot}: writer metadata ${g.name} became ${g.file ?? '(no file)'}`);
    for (const d of v.disks) {
      println(
        `    ${d.slot}: ${d.read}${d.fullReason ? ` (${d.fullReason})` : ''}, read ${formatSize(d.bytesRead)}${d.audit ? `; ${auditLine(d.audit)}` : ''}`,
      );
    }
  }
  for (const w of s.warnings) println(`  WARNING: ${w}`);
  for (const e of s.errors) println(`  error: ${e}`);
}

function auditLine(a: AuditResult): string {
  const what =
    a.mode === 'full'
      ? `${a.checked} of ${a.unchanged} unchanged chunks (full`
      : `${a.checked} of a sample of ${a.sampled} of ${a.unchanged} unchanged chunks (${formatRate(a.rate!)}`;
  const found =
    a.mismatches > 0
      ? `MISMATCH at offset ${a.firstMismatchOffset}${a.missedChunks !== null ? `, ${a.missedChunks} chunk(s) tracking missed` : ''}`
      : 'no mismatch';
  const early = a.stoppedEarly ? `, stopped at its ${((a.timeBudgetMs ?? 0) / 1000).toFixed(1)} s bound` : '';
  return `audit checked ${what}, seed ${a.seed}): ${found}${early}, read ${formatSize(a.bytesRead)} in ${ms(a.timeMs)}`;
}

export function restoreCommand(run: Run): Command {
  return withRepoOptions(
    new Command('restore')
      .description('restore the disks of a restore point (chunks fetched in parallel)')
      .argument('<point>', 'a restore point id (or a unique prefix)')
      .option('--to <dir>', 'where to write DIR/VM/SLOT.vhdx (with --register: first there, then moved into the store)')
      .option('--vm <name>', 'only this VM')
      .option('--disk <id>', 'only this disk (virtual disk id or slot)')
      .option('--format <f>', 'vhdx | raw', 'vhdx')
      .option('--parallel <n>', 'chunks fetched at once', '16')
      .option('--register', "make each restored VM a new VM of the host (disks written into the host's store)")
      .option('--name <name>', 'name of the registered VM (one VM; default VM-restored)')
      .option('--store <dir>', "the host's store for --register (or TIDEMARK_HOST)")
      .option('--json', 'print JSON'),
  ).action((point: string, o: RepoOpts & Record<string, string | boolean | undefined>) =>
    run(async () => {
      if (o.format !== 'vhdx' && o.format !== 'raw')
        throw new TidemarkError('INVALID_ARGUMENT', '--format is vhdx or raw');
      if (o.register && o.format !== 'vhdx')
        throw new TidemarkError('INVALID_ARGUMENT', 'only VHDX restores can be registered (drop --format raw)');
      if (!o.register && o.to === undefined)
        throw new TidemarkError('INVALID_ARGUMENT', "give --to DIR (or --register to restore into the host's store)");
      if (!o.register && o.name !== undefined)
        throw new TidemarkError('INVALID_ARGUMENT', '--name names the VM --register makes');
      // The host is reached before anything is read or written.
      const host = o.register ? await HostClient.connect({ store: o.store as string | undefined }) : undefined;
      const bars = progressBars(!o.json && process.stderr.isTTY === true);
      const common = {
        vm: o.vm as string | undefined,
        disk: o.disk as string | undefined,
        parallel: Number(o.parallel),
        onProgress: (file: string, done: number, total: number) => bars.update(file, done, total),
      };
      const summary: RestoreSummary & { registered?: string[] } = await withRepo(
        o,
        (repo) =>
          host
            ? restoreRegistered(repo, host, point, {
                ...common,
                to: o.to as string | undefined,
                name: o.name as string | undefined,
              })
            : restorePoint(repo, point, { ...common, to: o.to as string, format: o.format as 'vhdx' | 'raw' }),
        4,
      ).finally(() => bars.stop());
      const registered = summary.registered ?? [];
      if (o.json) return printJson({ ...summary, registered });
      println(`restored point ${summary.pointId} (${summary.time}) in ${(summary.durationMs / 1000).toFixed(1)} s`);
      for (const d of summary.disks) println(`  ${d.vm} ${d.slot}: ${d.file} (${formatSize(d.virtualSize)})`);
      for (const n of registered) println(`  registered as VM ${n}`);
    }),
  );
}

function ms(v: number | null): string {
  return v === null ? 'n/a' : `${v.toFixed(1)} ms`;
}
