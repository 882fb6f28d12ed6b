#!/usr/bin/env node
// Backup, incremental and restore: Tidemark against restic and borg, side by side on the same data.
//
// The data: a 4 GiB dynamic VHDX holding 2 GiB of random data in 1 MiB pieces on every other MiB, attached
// to a VM of a host running as its own process (`tidemark host`, as an administrator runs it: the backup
// pulls the disks over NBD from it). Then 80 MiB are rewritten in 80 scattered 1 MiB writes through the host
// (NBD). Timed, in one run:
//   full backup       tidemark backup (2016 flow) | restic backup FILE | borg create REPO::a FILE
//   incremental       the same after the rewrite (tidemark reads only the changed blocks; the others
//                     re-read the whole file and deduplicate)
//   restore           tidemark restore (raw) | restic restore latest
//   64 GiB            the same incremental on a 64 GiB disk with the same 80 MiB changed, against the
//                     4 GiB one: incrementals cost what changed, not what exists
//   audit cost        the 4 GiB incremental with the default tracking audit (1% of the disk's chunks, at least 16)
//                     and with --audit off, each timed as the whole command (`tidemark backup bench`, a process of
//                     its own, the host running, as restic and borg are timed), in BENCH_AUDIT_REPS pairs run back
//                     to back (alternating which goes first); the cost is the median of the pairs' differences over
//                     the median incremental with the audit (and the same on the runs' own durationMs, without
//                     the process start). The audit runs alongside the reading of the changed chunks, so its own
//                     time (the summary's audit.timeMs, printed beside) mostly overlaps it.
// Every Tidemark figure is a whole command as a user runs it (`tidemark backup bench`, `tidemark restore ...`:
// a process of its own, the host running), as restic and borg are timed.
// Ratios are ours/peer (lower is better). Each peer uses its default compression; restic and borg
// repositories are unencrypted-equivalent where possible (restic always encrypts; borg -e none).
// Tidemark's incrementals are short, so each is timed BENCH_REPS times (a new rewrite before each) and the median
// reported; the peers' runs and the restore are timed once.
// Environment: BENCH_TMPDIR (default /tmp), BENCH_SIZE_GIB (4), BENCH_BIG_GIB (64), BENCH_REPS (3),
// BENCH_AUDIT_REPS (9).
import { execFileSync, spawn } from 'node:child_process';
import { createCipheriv, randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { setTimeout as sleep } from 'node:timers/promises';
import { URL } from 'node:url';

const ROOT = new URL('..', import.meta.url).pathname;
const imp = (p) => import(path.join(ROOT, 'dist', p));
const { HostClient } = await imp('api/client.js');
const { NbdClient } = await imp('nbd/client.js');
const { Repository } = await imp('repository/index.js');
const { createVhdx } = await imp('formats/vhdx/create.js');
const { VhdxFile } = await imp('formats/vhdx/vhdx.js');

const MiB = 2 ** 20;
const GiB = 1024 * MiB;
const SIZE = Number(process.env.BENCH_SIZE_GIB ?? 4) * GiB;
const BIG = Number(process.env.BENCH_BIG_GIB ?? 64) * GiB;
const REPS = Math.max(1, Number(process.env.BENCH_REPS ?? 3));
const AUDIT_REPS = Math.max(1, Number(process.env.BENCH_AUDIT_REPS ?? 9));
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)];
const work = mkdtempSync(path.join(process.env.BENCH_TMPDIR ?? '/tmp', 'tidemark-bench-backup.'));
const env = {
  ...process.env,
  RESTIC_PASSWORD: 'bench',
  BORG_PASSPHRASE: '',
  BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK: 'yes',
};
const sh = (cmd, args) => execFileSync(cmd, args, { env, stdio: ['ignore', 'ignore', 'inherit'] });
/** `tidemark ARGS --json` as its own process; its parsed output. */
const tidemark = (args) =>
  JSON.parse(
    execFileSync(process.execPath, [path.join(ROOT, 'bin/tidemark.js'), ...args, '--json'], {
      env,
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'inherit'],
      maxBuffer: 64 * MiB,
    }),
  );
const time = async (fn) => {
  execFileSync('sync');
  const t = performance.now();
  await fn();
  execFileSync('sync');
  return (performance.now() - t) / 1000;
};

async function makeDisk(file, size, dataBytes) {
  await createVhdx(file, { size });
  const disk = await VhdxFile.open(file, { writable: true });
  const cipher = createCipheriv('aes-128-ctr', randomBytes(16), randomBytes(16));
  const batch = Buffer.alloc(64 * MiB);
  for (let at = 0; at < dataBytes * 2;) {
    const data = cipher.update(batch);
    for (let p = 0; p < data.length && at < dataBytes * 2; p += MiB, at += 2 * MiB)
      await disk.write(data.subarray(p, p + MiB), at);
  }
  await disk.close();
}

async function rewrite(nbd, size, seed) {
  const cipher = createCipheriv('aes-128-ctr', Buffer.alloc(16, seed), Buffer.alloc(16));
  for (let i = 0; i < 80; i++) {
    const mib = Math.floor((((i * 2654435761 + seed) % 2 ** 32) / 2 ** 32) * (size / MiB - 1));
    await nbd.write(mib * MiB, cipher.update(Buffer.alloc(MiB)));
  }
  await nbd.flush();
}

let host;
try {
  console.log(`backup bench: ${SIZE / GiB} GiB VHDX, ${SIZE / GiB / 2} GiB random data, in ${work}`);
  const store = path.join(work, 'store');
  host = spawn(
    process.execPath,
    [
      path.join(ROOT, 'bin/tidemark.js'),
      'host',
      '--store',
      store,
      '--socket',
      path.join(work, 'nbd.sock'),
      '--allow-disk-dir',
      work, // the bench's disks live beside the store
    ],
    {
      stdio: 'ignore', // its log would interleave with the results
    },
  );
  const exited = new Promise((resolve) => host.once('exit', resolve));
  let api;
  for (let i = 0; !api; i++) {
    try {
      api = await HostClient.connect({ store });
    } catch (err) {
      if (i > 200 || host.exitCode !== null) throw err;
      await sleep(50);
    }
  }
  const disk4 = path.join(work, 'disk4.vhdx');
  await makeDisk(disk4, SIZE, SIZE / 2);
  await api.createVm({ name: 'bench', disks: [{ slot: 'scsi0-0', path: disk4 }] });
  const vm = await api.startVm('bench');
  const repoPath = path.join(work, 'tidemark-repo');
  await (await Repository.init(repoPath, {})).close();
  /** `tidemark backup VM` as a user runs it: a process of its own against the running host. */
  const backup = (name, audit) =>
    tidemark(['backup', name, '--store', store, '--repo', repoPath, ...(audit ? ['--audit', audit] : [])]);
  sh('restic', ['init', '--repo', path.join(work, 'restic'), '-q']);
  sh('borg', ['init', '-e', 'none', path.join(work, 'borg')]);

  const results = {};
  let summary;
  results.fullOurs = await time(async () => (summary = backup('bench')));
  if (!summary.ok) throw new Error(summary.errors.join('; '));
  results.fullRestic = await time(() => sh('restic', ['backup', '-q', '--repo', path.join(work, 'restic'), disk4]));
  results.fullBorg = await time(() => sh('borg', ['create', `${path.join(work, 'borg')}::full`, disk4]));

  /** Rewrites 80 MiB of the VM's disk through the host, then times Tidemark's incremental of it. */
  const incremental = async (name, exportName, size, seed) => {
    const nbd = await NbdClient.connect({ socket: path.join(work, 'nbd.sock'), exportName });
    await rewrite(nbd, size, seed);
    await nbd.close();
    const t = await time(async () => (summary = backup(name)));
    if (!summary.ok) throw new Error(summary.errors.join('; '));
    if (summary.vms[0].disks[0].read !== 'incremental') throw new Error('incremental was not incremental');
    return t;
  };
  const inc4 = [await incremental('bench', vm.disks[0].export, SIZE, 7)];
  results.incRestic = await time(() => sh('restic', ['backup', '-q', '--repo', path.join(work, 'restic'), disk4]));
  results.incBorg = await time(() => sh('borg', ['create', `${path.join(work, 'borg')}::inc`, disk4]));

  results.restoreOurs = await time(async () =>
    tidemark([
      'restore',
      summary.pointId,
      '--repo',
      repoPath,
      '--to',
      path.join(work, 'restore-ours'),
      '--format',
      'raw',
    ]),
  );
  results.restoreRestic = await time(() =>
    sh('restic', [
      'restore',
      '-q',
      '--repo',
      path.join(work, 'restic'),
      'latest',
      '--target',
      path.join(work, 'restore-restic'),
    ]),
  );

  while (inc4.length < REPS) inc4.push(await incremental('bench', vm.disks[0].export, SIZE, 7 + inc4.length));
  results.incOurs = median(inc4);

  // The same incremental on a 64 GiB disk.
  const disk64 = path.join(work, 'disk64.vhdx');
  await makeDisk(disk64, BIG, SIZE / 2);
  await api.createVm({ name: 'big', disks: [{ slot: 'scsi0-0', path: disk64 }] });
  const big = await api.startVm('big');
  if (!backup('big').ok) throw new Error('64 GiB full backup failed');
  const inc64 = [];
  while (inc64.length < REPS) inc64.push(await incremental('big', big.disks[0].export, BIG, 9 + inc64.length));
  results.inc64Ours = median(inc64);
  const audit64 = summary.vms[0].disks[0].audit;

  // The audit's cost: the 4 GiB incremental as a command, with the default audit and with --audit off.
  const backupCommand = async (audit, seed) => {
    const nbd = await NbdClient.connect({ socket: path.join(work, 'nbd.sock'), exportName: vm.disks[0].export });
    await rewrite(nbd, SIZE, seed);
    await nbd.close();
    let out = '';
    const t = await time(() => {
      out = execFileSync(
        process.execPath,
        [
          path.join(ROOT, 'bin/tidemark.js'),
          'backup',
          'bench',
          '--store',
          store,
          '--repo',
          repoPath,
          '--audit',
          audit,
          '--json',
        ],
        { env, encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], maxBuffer: 64 * MiB },
      );
    });
    const s = JSON.parse(out);
    const d = s.vms[0].disks[0];
    if (!s.ok || d.read !== 'incremental') throw new Error(`audit ${audit}: ${s.errors.join('; ') || d.fullReason}`);
    if ((audit === 'off') !== (d.audit === null)) throw new Error(`audit ${audit}: unexpected audit figures`);
    return { t, run: s.durationMs / 1000, audit: d.audit };
  };
  const pairs = [];
  for (let i = 0; i < AUDIT_REPS; i++) {
    const seed = 31 + 2 * i;
    const pair = {};
    for (const a of i % 2 === 0 ? ['1%', 'off'] : ['off', '1%'])
      pair[a] = await backupCommand(a, seed + (a === 'off' ? 1 : 0));
    pairs.push(pair);
  }
  results.incAudit = median(pairs.map((p) => p['1%'].t));
  results.incNoAudit = median(pairs.map((p) => p.off.t));
  results.auditCost = median(pairs.map((p) => p['1%'].t - p.off.t)) / results.incAudit;
  // The same on the runs' own durations (the summary's durationMs: no process start, no repository opening).
  results.auditCostRun = median(pairs.map((p) => p['1%'].run - p.off.run)) / median(pairs.map((p) => p['1%'].run));
  results.auditMs = median(pairs.map((p) => p['1%'].audit.timeMs));
  const auditSample = pairs[0]['1%'].audit;
  host.kill('SIGINT');
  await exited;

  const r = (a, b) => (a / b).toFixed(3);
  const s = (x) => `${x.toFixed(2)} s`;
  console.log(
    `full backup:   tidemark ${s(results.fullOurs)}  restic ${s(results.fullRestic)}  borg ${s(results.fullBorg)}`,
  );
  console.log(
    `  ours/restic ${r(results.fullOurs, results.fullRestic)} (goal ≤ 0.5)   ours/borg ${r(results.fullOurs, results.fullBorg)}`,
  );
  console.log(
    `incremental:   tidemark ${s(results.incOurs)}  restic ${s(results.incRestic)}  borg ${s(results.incBorg)}`,
  );
  console.log(
    `  ours/restic ${r(results.incOurs, results.incRestic)} (goal ≤ 0.05)   ours/borg ${r(results.incOurs, results.incBorg)}`,
  );
  console.log(`restore:       tidemark ${s(results.restoreOurs)}  restic ${s(results.restoreRestic)}`);
  console.log(`  ours/restic ${r(results.restoreOurs, results.restoreRestic)} (goal ≤ 0.5)`);
  console.log(
    `${BIG / GiB} GiB incremental: ${s(results.inc64Ours)}; ${BIG / GiB} GiB / ${SIZE / GiB} GiB ${r(results.inc64Ours, results.incOurs)} (goal ≤ 1.3)`,
  );
  console.log(
    `audit cost:    ${(results.auditCost * 100).toFixed(1)}% of the incremental (goal ≤ 10%): ` +
      `tidemark backup with the default audit ${s(results.incAudit)}, --audit off ${s(results.incNoAudit)} ` +
      `(whole commands, medians of ${AUDIT_REPS} pairs: ${pairs.map((p) => `${p['1%'].t.toFixed(2)}/${p.off.t.toFixed(2)}`).join(' ')} s)`,
  );
  console.log(
    `  on the runs' own durations (summary durationMs, same runs): ${(results.auditCostRun * 100).toFixed(1)}%`,
  );
  console.log(
    `  the audit itself: ${results.auditMs.toFixed(0)} ms, alongside the changed chunks' reads ` +
      `(${auditSample.checked} of ${auditSample.unchanged} unchanged chunks checked, ${(auditSample.bytesRead / MiB).toFixed(0)} MiB read); ` +
      `the ${BIG / GiB} GiB incremental's: ${audit64.timeMs.toFixed(0)} ms (${audit64.checked} chunks, ${(audit64.bytesRead / MiB).toFixed(0)} MiB read)`,
  );
  console.log(
    `(tidemark incrementals: medians of ${REPS}: ${SIZE / GiB} GiB ${inc4.map((x) => x.toFixed(2)).join('/')} s, ${BIG / GiB} GiB ${inc64.map((x) => x.toFixed(2)).join('/')} s)`,
  );
} finally {
  if (host && host.exitCode === null) host.kill('SIGKILL');
  rmSync(work, { recursive: true, force: true });
}
