/**
 * `tidemark repo | points | verify | prune | gc`: the backup repository from the command line. The repository is
 * `--repo PATH` or $TIDEMARK_REPO; an encrypted one opens with $TIDEMARK_PASSPHRASE, --passphrase-file F or
 * --key-file F.
 */
import { Command } from 'commander';
import { readFile, writeFile } from 'node:fs/promises';
import { fromSystemError, InvalidArgumentError, TidemarkError } from '../errors.js';
import {
  DEFAULT_SCRYPT_LOG_N,
  defaultWorkers,
  newKeyFileContents,
  parseTrustEntry,
  readSmallFile,
  Repository,
  type Damage,
  type OpenOptions,
  type PruneEntry,
} from '../repository/index.js';
import { formatSize, parseSize } from '../util/size.js';
import { EXIT, printJson, println, progressReporter } from './output.js';

type Run = (fn: () => Promise<number | void>) => Promise<void>;

export interface RepoOpts {
  repo?: string;
  passphraseFile?: string;
  keyFile?: string;
  json?: boolean;
}

/** Adds --repo, --passphrase-file and --key-file to a command that opens a repository. */
export function withRepoOptions(cmd: Command): Command {
  return cmd
    .option('--repo <path>', 'the repository (default: $TIDEMARK_REPO)')
    .option('--passphrase-file <file>', 'read the passphrase from this file (default: $TIDEMARK_PASSPHRASE)')
    .option('--key-file <file>', 'open with this key file');
}

function repoPath(o: RepoOpts): string {
  const p = o.repo ?? process.env.TIDEMARK_REPO;
  if (!p) throw new InvalidArgumentError('no repository given: use --repo PATH or set TIDEMARK_REPO');
  return p;
}

/** The passphrase file's first line (its final newline is not part of the passphrase). */
async function readPassphraseFile(file: string): Promise<string> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw fromSystemError(err, 'read passphrase file', file);
  }
  const pw = text.replace(/\r?\n$/, '');
  if (pw.length === 0) throw new InvalidArgumentError(`passphrase file ${file} is empty`);
  return pw;
}

async function secrets(o: RepoOpts): Promise<OpenOptions> {
  if (o.keyFile) return { keyFile: o.keyFile };
  if (o.passphraseFile) return { passphrase: await readPassphraseFile(o.passphraseFile) };
  if (process.env.TIDEMARK_PASSPHRASE) return { passphrase: process.env.TIDEMARK_PASSPHRASE };
  return {};
}

/**
 * Opens the repository of a command's options for `fn` and closes it after. `workers`: codec worker threads, for
 * commands that seal or open many chunks (backup, restore, verify); the others work inline.
 */
export async function withRepo<T>(
  o: RepoOpts,
  fn: (repo: Repository) => Promise<T>,
  workers = 0,
  opts: { quiet?: boolean } = {},
): Promise<T> {
  const repo = await Repository.open(repoPath(o), { ...(await secrets(o)), workers });
  if (!opts.quiet) warnUnauthenticated(repo);
  try {
    return await fn(repo);
  } finally {
    await repo.close();
  }
}

/** Says so on stderr, once per command, when a forged restore point could not be told from a real one. */
function warnUnauthenticated(repo: Repository): void {
  const i = repo.integrity;
  if (i.authenticated) return;
  process.stderr.write(
    i.keyMissing
      ? `tidemark: warning: this machine does not hold the integrity key of repository ${repo.location}, so its restore points cannot be authenticated here (a forged one would not be noticed); copy the key from a machine that has it: \`tidemark repo key export FILE\` there, \`tidemark repo key import FILE\` here\n`
      : `tidemark: warning: repository ${repo.location} has no integrity key (made by an older Tidemark): a forged restore point would not be noticed\n`,
  );
}

function count(text: string, what: string): number {
  if (!/^\d+$/.test(text)) throw new InvalidArgumentError(`${what} "${text}" is not a whole number`);
  return Number(text);
}

const short = (id: string) => `${id.slice(0, 16)}…`;
const when = (iso: string) => iso.replace('T', ' ').replace(/\.\d+Z$/, 'Z');

function pad(rows: string[][]): string[] {
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]))).join('  '));
}

function describeDamage(d: Damage): string[] {
  const lines = [`DAMAGED ${d.object} ${d.object === 'manifest' ? d.id : short(d.id)} (${d.problem}): ${d.message}`];
  for (const a of d.affects) {
    const where = a.vm ? ` VM ${a.vm} disk ${a.disk} (${a.diskId})` : '';
    const slots =
      a.slots !== undefined
        ? `, ${a.slots} chunk${a.slots === 1 ? '' : 's'} at offset${a.slots === 1 ? '' : 's'} ${a.offsets!.join(', ')}${a.slots > a.offsets!.length ? ', …' : ''}`
        : '';
    lines.push(`  affects ${a.pointId}${where}${slots}`);
  }
  return lines;
}

export function repoCommands(run: Run): Command[] {
  // ------------------------------------------------------------------ repo
  const repo = new Command('repo').description('backup repositories: create one, describe it, clear stale locks');

  repo
    .command('init')
    .description('create a repository in a new or empty directory')
    .argument('<path>')
    .option('--chunk-size <size>', 'chunk size, a power of two from 64K to 8M (default 1M)')
    .option('--encrypt', 'encrypt with the passphrase from $TIDEMARK_PASSPHRASE or --passphrase-file')
    .option('--passphrase-file <file>', 'read the passphrase from this file (implies --encrypt)')
    .option('--key-file <file>', 'encrypt with this key file (created, with a new random key, if it does not exist)')
    .option('--kdf-cost <log2n>', `scrypt cost as log2(N), 15–20 (default ${DEFAULT_SCRYPT_LOG_N})`)
    .option('--json', 'machine-readable output')
    .action((where: string, o) =>
      run(async () => {
        const chunkSize = o.chunkSize ? parseSize(o.chunkSize, '--chunk-size') : undefined;
        let passphrase: string | undefined;
        if (o.passphraseFile) passphrase = await readPassphraseFile(o.passphraseFile);
        else if (o.encrypt && process.env.TIDEMARK_PASSPHRASE) passphrase = process.env.TIDEMARK_PASSPHRASE;
        if (o.encrypt && passphrase === undefined && !o.keyFile) {
          throw new InvalidArgumentError(
            '--encrypt needs a passphrase ($TIDEMARK_PASSPHRASE or --passphrase-file) or --key-file',
          );
        }
        let keyFileCreated = false;
        if (o.keyFile) {
          try {
            await writeFile(o.keyFile, newKeyFileContents(), { flag: 'wx', mode: 0o600 });
            keyFileCreated = true;
          } catch (err) {
            if ((err as NodeJS.ErrnoException).code !== 'EEXIST')
              throw fromSystemError(err, 'create key file', o.keyFile);
          }
        }
        const r = await Repository.init(where, {
          chunkSize,
          passphrase,
          keyFile: o.keyFile,
          scryptLogN: o.kdfCost ? count(o.kdfCost, '--kdf-cost') : undefined,
          workers: 0,
        });
        try {
          const info = {
            path: r.location,
            id: r.config.id,
            chunkSize: r.chunkSize,
            encryption: r.config.encryption ? r.config.encryption.keys.map((k) => k.kind) : null,
            keyFile: o.keyFile ?? null,
            keyFileCreated,
            integrityKeyFile: r.integrity.mode === 'hmac-sha256' ? r.integrity.trustFile : null,
          };
          if (o.json) return printJson(info);
          println(`created repository ${r.location} (chunks of ${formatSize(r.chunkSize)})`);
          if (info.encryption) println(`encrypted (AES-256-GCM); opens with: ${info.encryption.join(', ')}`);
          else {
            println(
              `not encrypted; its restore points are authenticated with an integrity key kept in ${info.integrityKeyFile}`,
            );
            println(
              'every other machine that reads or writes it needs that key: `tidemark repo key export FILE` here, `tidemark repo key import FILE` there',
            );
          }
          if (keyFileCreated) {
            println(
              `created key file ${o.keyFile}: keep a copy in a safe place, the repository cannot be read without it`,
            );
          }
        } finally {
          await r.close();
        }
      }),
    );

  withRepoOptions(repo.command('info'))
    .description('what a repository is and holds: chunk size, encryption, points, chunks, locks')
    .option('--json', 'machine-readable output')
    .action((o) =>
      run(() =>
        withRepo(o, async (r) => {
          const i = await r.info();
          // Entries that cannot be read are damage: named, and the exit status says so (1).
          const status = i.damage.length > 0 ? EXIT.FAILED : EXIT.OK;
          if (o.json) {
            printJson(i);
            return status;
          }
          println(`repository ${i.location}`);
          println(`  id              ${i.id}`);
          println(`  created         ${when(i.createdAt)}`);
          println(`  format          version ${i.formatVersion}`);
          println(
            `  chunk size      ${formatSize(i.chunkSize)} (named by ${i.chunkId}, compressed with ${i.compression})`,
          );
          println(
            `  encryption      ${i.encryption ? `${i.encryption.cipher}, opens with: ${i.encryption.keySlots.join(', ')}` : 'none'}`,
          );
          println(
            `  integrity       ${
              i.integrity.mode === 'aes-256-gcm'
                ? 'authenticated by the encryption'
                : i.integrity.mode === 'hmac-sha256'
                  ? i.integrity.authenticated
                    ? `restore points authenticated with the integrity key held here (${r.integrity.trustFile})`
                    : 'NOT authenticated here: this machine does not hold the integrity key (`tidemark repo key import`)'
                  : 'NONE: no integrity key (made by an older Tidemark)'
            }`,
          );
          println(`  restore points  ${i.points}`);
          println(`  indexes         ${i.indexes.count} (${formatSize(i.indexes.bytes)})`);
          println(`  chunks          ${i.chunks.count} (${formatSize(i.chunks.bytes)} stored)`);
          println(
            `  packs           ${i.packs.count} (${formatSize(i.packs.bytes)}), listed by ${i.packIndexes.count} pack index${i.packIndexes.count === 1 ? '' : 'es'}`,
          );
          if (i.locks.length === 0) println('  locks           none');
          for (const l of i.locks) {
            println(
              `  lock            ${l.damaged ? `${l.key} (unreadable)` : `${l.operation}, ${l.kind}, pid ${l.pid} on ${l.hostname} since ${l.createdAt}`}${l.stale ? ' (stale)' : ''}`,
            );
          }
          for (const d of i.damage) println(`DAMAGED ${d.object} ${d.key} (${d.problem}): ${d.message}`);
          if (i.damage.length > 0)
            println(`${i.damage.length} damaged entr${i.damage.length === 1 ? 'y' : 'ies'}: run \`tidemark verify\``);
          return status;
        }),
      ),
    );

  withRepoOptions(repo.command('unlock'))
    .description('remove locks of processes of this host that have ended; --force removes every lock')
    .option('--force', 'remove every lock, also of other hosts (only when no backup, prune or gc is running!)')
    .option('--json', 'machine-readable output')
    .action((o) =>
      run(() =>
        withRepo(o, async (r) => {
          const removed = await r.unlock({ force: o.force === true });
          if (o.json) return printJson({ removed });
          println(`removed ${removed.length} lock${removed.length === 1 ? '' : 's'}`);
          const left = await r.locks();
          if (left.length > 0) {
            println(
              `${left.length} lock${left.length === 1 ? '' : 's'} left (held, or of another host: --force removes them)`,
            );
          }
        }),
      ),
    );

  const key = repo
    .command('key')
    .description("an unencrypted repository's integrity key: copy it to every machine that reads or writes it");
  withRepoOptions(key.command('export'))
    .description("write this machine's integrity key of the repository to FILE (created, mode 0600)")
    .argument('<file>')
    .option('--json', 'machine-readable output')
    .action((file: string, o) =>
      run(() =>
        withRepo(o, async (r) => {
          const entry = r.exportTrust();
          try {
            await writeFile(file, JSON.stringify(entry, null, 2) + '\n', { flag: 'wx', mode: 0o600 });
          } catch (err) {
            throw fromSystemError(err, 'create', file);
          }
          if (o.json) return printJson({ repository: entry.repository, file });
          println(
            `wrote the integrity key of repository ${entry.repository} to ${file}: keep it secret, like a key file`,
          );
        }),
      ),
    );
  withRepoOptions(key.command('import'))
    .description("keep the repository's integrity key from FILE (written by `repo key export`) on this machine")
    .argument('<file>')
    .option('--json', 'machine-readable output')
    .action((file: string, o) =>
      run(() =>
        withRepo(
          o,
          async (r) => {
            const raw = await readSmallFile(file, 'key file');
            if (raw === null) throw new TidemarkError('NOT_FOUND', `no key file ${file}`);
            const stored = await r.importTrust(parseTrustEntry(raw, file));
            if (o.json) return printJson({ repository: r.config.id, file: stored });
            println(
              `this machine now authenticates the restore points of repository ${r.location} (key kept in ${stored})`,
            );
          },
          0,
          { quiet: true },
        ),
      ),
    );

  withRepoOptions(repo.command('repair-index'))
    .description("rebuild the pack indexes from the packs' own headers (after a damaged or lost pack index)")
    .option('--json', 'machine-readable output')
    .action((o) =>
      run(() =>
        withRepo(o, async (r) => {
          const report = await r.repairPackIndexes();
          if (o.json) return printJson(report);
          println(`indexed ${report.chunks} chunks in ${report.packs} pack${report.packs === 1 ? '' : 's'}`);
          for (const u of report.unreadable) println(`unreadable, left out: ${u.key}: ${u.message}`);
          if (report.unreadable.length > 0)
            throw new TidemarkError(
              'REPOSITORY_CORRUPT',
              `${report.unreadable.length} pack(s) cannot be read: run \`tidemark verify\``,
            );
        }),
      ),
    );

  // ------------------------------------------------------------------ points
  const points = new Command('points').description('restore points in a repository');

  withRepoOptions(points.command('list'))
    .description('restore points, oldest first')
    .option('--vm <name>', 'only points holding this VM (name or id)')
    .option('--json', 'machine-readable output')
    .action((o) =>
      run(() =>
        withRepo(o, async (r) => {
          const { points: list, damaged } = await r.listPoints({ vm: o.vm });
          // A point that cannot be read is listed as damaged, and the exit status says so (1).
          const status = damaged.length > 0 ? EXIT.FAILED : EXIT.OK;
          if (o.json) {
            printJson({ points: list, damaged });
            return status;
          }
          if (list.length === 0) println(o.vm ? `no restore point holds VM ${o.vm}` : 'no restore points');
          else {
            const rows = [['ID', 'TIME', 'FLOW', 'VMS', 'DISKS', 'READ', 'NEW', 'STORED']];
            for (const p of list) {
              rows.push([
                p.id,
                when(p.time),
                p.flow,
                p.vms.map((v) => v.name).join(','),
                String(p.vms.reduce((n, v) => n + v.disks.length, 0)),
                formatSize(p.statistics.bytesRead),
                formatSize(p.statistics.bytesNew),
                formatSize(p.statistics.bytesStored),
              ]);
            }
            for (const line of pad(rows)) println(line);
          }
          for (const d of damaged) println(`DAMAGED ${d.id}: ${d.message}`);
          return status;
        }),
      ),
    );

  withRepoOptions(points.command('show'))
    .description("a restore point's manifest: VMs, disks, consistency, change-tracking ids, statistics")
    .argument('<point>', 'id, or a unique prefix of one')
    .option('--json', 'the whole manifest as stored')
    .action((id: string, o) =>
      run(() =>
        withRepo(o, async (r) => {
          const m = await r.readPoint(id);
          if (o.json) return printJson(m);
          println(`restore point ${m.id}`);
          println(`  time      ${when(m.time)}`);
          println(`  flow      ${m.flow}, ${m.snapshots} storage snapshot${m.snapshots === 1 ? '' : 's'}`);
          println(`  parent    ${m.parentId ?? '(none)'}`);
          println(
            `  data      read ${formatSize(m.statistics.bytesRead)}, new ${formatSize(m.statistics.bytesNew)}, stored ${formatSize(m.statistics.bytesStored)} in ${(m.statistics.durationMs / 1000).toFixed(1)} s`,
          );
          for (const vm of m.vms) {
            const freeze = vm.freezeWindowMs === null ? '' : `, frozen ${vm.freezeWindowMs} ms`;
            println(`  VM ${vm.name} (${vm.id}): ${vm.consistency}-consistent${freeze}`);
            for (const d of vm.disks) {
              const how = d.read === 'full' ? `full (${d.fullReason ?? 'no reason given'})` : 'incremental';
              println(
                `    ${d.controller.bus}${d.controller.controller}:${d.controller.location} ${d.name} (${d.diskId}) ${formatSize(d.virtualSize)} ${d.format}, ${how}, rct ${d.rctId ?? '-'}, read ${formatSize(d.stats.bytesRead)}, new ${formatSize(d.stats.bytesNew)}`,
              );
            }
          }
        }),
      ),
    );

  withRepoOptions(points.command('forget'))
    .description("remove one restore point's manifest (e.g. one verify found damaged); gc then frees its chunks")
    .argument('<point>', 'id, or a unique prefix of one')
    .option('--json', 'machine-readable output')
    .action((id: string, o) =>
      run(() =>
        withRepo(o, async (r) => {
          const removed = await r.forgetPoint(id);
          if (o.json) return printJson({ removed });
          println(`forgot restore point ${removed} (run \`tidemark gc\` to free its space)`);
        }),
      ),
    );

  // ------------------------------------------------------------------ verify
  const verify = withRepoOptions(new Command('verify'))
    .description('re-read and re-hash every chunk (of one point, or all); exit 1 when damage is found')
    .argument('[point]', 'id, or a unique prefix of one (default: every point)')
    .option('--json', 'machine-readable output')
    .action((id: string | undefined, o) =>
      run(() =>
        withRepo(
          o,
          async (r) => {
            const progress = o.json ? { update() {}, end() {} } : progressReporter('verify');
            // Stored bytes read, so the rate shown is the real read throughput.
            const report = await r.verify(id, { onProgress: (p) => progress.update(p.doneBytes, p.totalBytes) });
            progress.end();
            if (o.json) printJson(report);
            else {
              const c = report.checked;
              println(
                `verified ${report.scope === 'all' ? 'all restore points' : `restore point ${report.scope}`}: ${c.points} point${c.points === 1 ? '' : 's'}, ${c.indexes} index${c.indexes === 1 ? '' : 'es'}, ${c.chunks} chunk${c.chunks === 1 ? '' : 's'} (${formatSize(c.storedBytes)} stored)`,
              );
              for (const d of report.damage) for (const line of describeDamage(d)) println(line);
              if (report.ok) println('no damage found');
              else {
                println(
                  `${report.affectedPoints.length} restore point${report.affectedPoints.length === 1 ? '' : 's'} affected: ${report.affectedPoints.join(', ')}`,
                );
              }
            }
            return report.ok ? EXIT.OK : EXIT.FAILED;
          },
          defaultWorkers(),
        ),
      ),
    );

  // ------------------------------------------------------------------ prune
  const prune = withRepoOptions(new Command('prune'))
    .description('remove the restore points a retention policy does not keep (per set of VMs; periods in UTC)')
    .option('--keep-last <n>', 'the n newest points')
    .option('--keep-hourly <n>', 'the newest point of each of the n latest hours that have one')
    .option('--keep-daily <n>', 'likewise per day')
    .option('--keep-weekly <n>', 'likewise per ISO week')
    .option('--keep-monthly <n>', 'likewise per month')
    .option('--keep-yearly <n>', 'likewise per year')
    .option('--dry-run', 'say what would be removed, remove nothing')
    .option('--json', 'machine-readable output')
    .action((o) =>
      run(() => {
        const n = (v: string | undefined, name: string) => (v === undefined ? undefined : count(v, name));
        const policy = {
          keepLast: n(o.keepLast, '--keep-last'),
          keepHourly: n(o.keepHourly, '--keep-hourly'),
          keepDaily: n(o.keepDaily, '--keep-daily'),
          keepWeekly: n(o.keepWeekly, '--keep-weekly'),
          keepMonthly: n(o.keepMonthly, '--keep-monthly'),
          keepYearly: n(o.keepYearly, '--keep-yearly'),
          dryRun: o.dryRun === true,
        };
        return withRepo(o, async (r) => {
          const report = await r.prune(policy);
          if (o.json) return printJson(report);
          const row = (verb: string, e: PruneEntry) => [
            verb,
            e.id,
            when(e.time),
            e.vms.join(','),
            e.reasons.join(', '),
          ];
          const rows = [
            ...report.kept.map((e) => row('keep', e)),
            ...report.removed.map((e) => row(report.dryRun ? 'would remove' : 'remove', e)),
          ].sort((a, b) => (a[2] < b[2] ? 1 : -1));
          if (rows.length > 0) for (const line of pad(rows)) println(line);
          for (const d of report.damaged) println(`keep (damaged, never pruned) ${d.id}: ${d.message}`);
          const k = report.removed.length;
          println(
            report.dryRun
              ? `dry run: would remove ${k} restore point${k === 1 ? '' : 's'}, keep ${report.kept.length}`
              : `removed ${k} restore point${k === 1 ? '' : 's'}, kept ${report.kept.length}${k > 0 ? ' (run `tidemark gc` to free their space)' : ''}`,
          );
        });
      }),
    );

  // ------------------------------------------------------------------ gc
  const gc = withRepoOptions(new Command('gc'))
    .description('delete chunks and indexes no restore point references (exclusive: waits for no backup, fails BUSY)')
    .option('--dry-run', 'count what would be deleted, delete nothing')
    .option('--json', 'machine-readable output')
    .action((o) =>
      run(() =>
        withRepo(o, async (r) => {
          const g = await r.gc({ dryRun: o.dryRun === true });
          if (o.json) return printJson(g);
          const verb = g.dryRun ? 'would remove' : 'removed';
          println(
            `${verb} ${g.chunksRemoved} chunk${g.chunksRemoved === 1 ? '' : 's'} and ${g.indexesRemoved} index${g.indexesRemoved === 1 ? '' : 'es'} (${formatSize(g.bytesRemoved)}); kept ${g.chunksKept} chunks and ${g.indexesKept} indexes of ${g.points} restore point${g.points === 1 ? '' : 's'}`,
          );
          if (g.packsRemoved > 0) {
            println(
              `${g.dryRun ? 'would delete' : 'deleted'} ${g.packsRemoved} pack${g.packsRemoved === 1 ? '' : 's'} (${g.packsRepacked} repacked${g.dryRun ? '' : ` into ${g.packsWritten}`}), kept ${g.packsKept}`,
            );
          }
          if (g.missingIndexes.length > 0) {
            println(
              `${g.missingIndexes.length} index(es) named by restore points are missing: run \`tidemark verify\``,
            );
          }
        }),
      ),
    );

  return [repo, points, verify, prune, gc];
}
