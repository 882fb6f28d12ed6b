/**
 * Auto-recovery on the host, the 2008 R2 / 2012 way (HYPERV-BACKUP-MODEL.md §1.1): after the storage snapshot,
 * every disk of the batch is "mounted" from the snapshot and rolled back to the guest's point before its data is
 * read. Here that is real work with QEMU's own tools, over the snapshot's read-only NBD exports:
 *   1. mount: a writable qcow2 overlay per disk (a differencing child) over the snapshot's export;
 *   2. recover: the file systems found on the disk (whole disk, MBR or GPT partitions; ext2/3/4) get their own
 *      recovery on the overlay through a raw FUSE view of it (`e2fsck -p`: the journal replayed, orphans
 *      cleaned), written into the overlay only, never into the snapshot; a disk with no file system has nothing
 *      to replay, and its recovery is the overlay itself (said so in the note);
 *   3. serve: the recovered overlays exported read-only over NBD, for the data phase to read.
 * Two qemu-storage-daemon processes per batch (one for recovery, only when a file system was found; one to
 * serve), and one overlay per disk: the cost per disk that made the old flows scale badly.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { TidemarkError } from '../errors.js';
import { NbdClient, type NbdTarget } from '../nbd/client.js';
import { forEachBounded } from '../util/bounded.js';
import { pidAlive } from '../util/process.js';

const run = promisify(execFile);

/** A disk of the snapshot set to mount and recover. */
export interface MountDisk {
  vm: string;
  slot: string;
  /** The snapshot's read-only export of the disk. */
  export: string;
  virtualSize: number;
}

/** A file system found on a disk: where it starts, how long it is. */
export interface FoundFileSystem {
  type: 'ext';
  offset: number;
  length: number;
  /** where it was found: `disk`, `mbr N`, `gpt N` */
  where: string;
}

export interface RecoveredVm {
  /** The batch's auto-recovery, start to served (a batch of one VM: that VM's own). */
  ms: number;
  /** What was done, per disk. */
  note: string;
}

export interface HostMountOptions {
  /** Where the snapshot's exports are served (with TLS, `tlsDir` holds the client credentials). */
  nbd: Pick<NbdTarget, 'socket' | 'host' | 'port' | 'tls'>;
  tlsDir?: string;
  /** Directory for the overlays (default: the system's temporary directory). */
  workDir?: string;
  /** Disks probed / recovered at once (default 4). */
  parallel?: number;
  log?(line: string): void;
}

/** The recovered overlays of one batch, served read-only over NBD until `close`. */
export class HostMount {
  private constructor(
    private readonly dir: string,
    /** Where the recovered overlays are served. */
    readonly target: { socket: string },
    /** The overlay's export name per `vm/slot`. */
    readonly exports: Map<string, string>,
    readonly recovered: Map<string, RecoveredVm>,
    /** Bytes the recovery wrote into each disk's overlay, by `vm/slot` (0: the disk reads as the snapshot holds it). */
    readonly changed: Map<string, number>,
    private readonly pidFile: string,
  ) {}

  /** Bytes the recovery changed on a disk: when not 0, the disk is not what the checkpoint's tracking id sealed. */
  changedBytes(vm: string, slot: string): number {
    return this.changed.get(`${vm}/${slot}`) ?? 0;
  }

  exportOf(vm: string, slot: string): string | undefined {
    return this.exports.get(`${vm}/${slot}`);
  }

  /** Mounts every disk of the batch from the snapshot, recovers it, and serves the result. */
  static async mount(disks: MountDisk[], opts: HostMountOptions): Promise<HostMount> {
    const started = performance.now();
    const parallel = opts.parallel ?? 4;
    const dir = await mkdtemp(path.join(opts.workDir ?? os.tmpdir(), 'tidemark-autorecovery-'));
    const pidFiles: string[] = [];
    try {
      const items = disks.map((d, i) => ({
        d,
        i,
        overlay: path.join(dir, `disk${i}.qcow2`),
        fs: [] as FoundFileSystem[],
        outcome: [] as string[],
      }));
      // 1. Mount: probe each disk of the snapshot for file systems and make its overlay.
      await forEachBounded(items, parallel, async (it) => {
        it.fs = await probeFileSystems(opts.nbd, it.d.export, it.d.virtualSize);
        await run('qemu-img', ['create', '-q', '-f', 'qcow2', it.overlay, String(it.d.virtualSize)]);
      });
      const tls = tlsArgs(opts);
      const source = (it: (typeof items)[number], readOnly: boolean) =>
        overlayBlockdevs(opts.nbd, it.d.export, it.i, it.overlay, readOnly, tls.length > 0);

      // 2. Recover: each file system found gets its own recovery on the overlay, through a raw FUSE view.
      const withFs = items.filter((it) => it.fs.length > 0);
      if (withFs.length > 0) {
        const args = [...tls];
        const views: { it: (typeof items)[number]; fs: FoundFileSystem; file: string }[] = [];
        for (const it of withFs) {
          args.push(...source(it, false));
          it.fs.forEach((fs, j) => {
            const file = path.join(dir, `disk${it.i}.fs${j}.raw`);
            views.push({ it, fs, file });
            args.push(
              '--blockdev',
              JSON.stringify({
                driver: 'raw',
                'node-name': `p${it.i}_${j}`,
                file: `o${it.i}`,
                offset: fs.offset,
                size: fs.length,
              }),
              '--export',
              JSON.stringify({
                type: 'fuse',
                id: `u${it.i}_${j}`,
                'node-name': `p${it.i}_${j}`,
                mountpoint: file,
                writable: true,
              }),
            );
          });
        }
        for (const v of views) await writeFile(v.file, '');
        const pid = path.join(dir, 'recover.pid');
        pidFiles.push(pid);
        await startDaemon(args, pid);
        try {
          await forEachBounded(views, parallel, async (v) => {
            v.it.outcome.push(`${v.fs.type} file system (${v.fs.where}): ${await recoverExt(v.file)}`);
          });
        } finally {
          await stopDaemon(pid);
          pidFiles.pop();
        }
      }
      // What the recovery wrote: the overlays' own allocated data (they name no backing file of their own).
      const changed = new Map<string, number>();
      await forEachBounded(withFs, parallel, async (it) => {
        const bytes = await overlayBytes(it.overlay);
        changed.set(`${it.d.vm}/${it.d.slot}`, bytes);
        if (bytes > 0) it.outcome.push(`the recovery changed ${bytes} bytes of the disk`);
      });
      const recovered = new Map<string, RecoveredVm>();
      const byVm = new Map<string, typeof items>();
      for (const it of items) byVm.set(it.d.vm, [...(byVm.get(it.d.vm) ?? []), it]);
      for (const [vm, list] of byVm) {
        recovered.set(vm, {
          ms: 0,
          note: list
            .map(
              (it) =>
                `${it.d.slot}: ${
                  it.outcome.length
                    ? it.outcome.join('; ')
                    : 'no file system on the disk: nothing to replay, the recovery is the overlay over the snapshot'
                }`,
            )
            .join('; '),
        });
      }

      // 3. Serve the recovered overlays read-only.
      const socket = path.join(dir, 'nbd.sock');
      const exports = new Map<string, string>();
      const args = [...tls, '--nbd-server', JSON.stringify({ addr: { type: 'unix', path: socket } })];
      for (const it of items) {
        const name = `recovered/${it.d.vm}/${it.d.slot}`;
        exports.set(`${it.d.vm}/${it.d.slot}`, name);
        args.push(
          ...source(it, true),
          '--export',
          JSON.stringify({ type: 'nbd', id: `n${it.i}`, 'node-name': `o${it.i}`, name, writable: false }),
        );
      }
      const pid = path.join(dir, 'serve.pid');
      pidFiles.push(pid);
      await startDaemon(args, pid);
      const ms = performance.now() - started;
      for (const r of recovered.values()) r.ms = ms;
      return new HostMount(dir, { socket }, exports, recovered, changed, pid);
    } catch (err) {
      for (const p of pidFiles) await stopDaemon(p).catch(() => undefined);
      await rm(dir, { recursive: true, force: true });
      throw err;
    }
  }

  /** Stops serving and removes the overlays. */
  async close(): Promise<void> {
    try {
      await stopDaemon(this.pidFile);
    } finally {
      await rm(this.dir, { recursive: true, force: true });
    }
  }
}

export async function overlayBytes(overlay: string): Promise<number> {
  const { stdout } = await run('qemu-img', ['map', '--output=json', '-f', 'qcow2', overlay]);
  const map = JSON.parse(stdout) as { length: number; data: boolean; depth: number }[];
  return map.filter((e) => e.data && e.depth === 0).reduce((n, e) => n + e.length, 0);
}

/**
 * `qemu-storage-daemon --blockdev` arguments for one disk: the snapshot's export `exportName` (read-only, node
 * `sN`) under a qcow2 overlay file (node `oN`, writable unless `readOnly`): the recovery writes the overlay only.
 */
export function overlayBlockdevs(
  nbd: HostMountOptions['nbd'],
  exportName: string,
  i: number,
  overlay: string,
  readOnly: boolean,
  tls: boolean,
): string[] {
  return [
    '--blockdev',
    JSON.stringify({
      driver: 'nbd',
      'node-name': `s${i}`,
      'read-only': true,
      server: nbd.socket
        ? { type: 'unix', path: nbd.socket }
        : { type: 'inet', host: nbd.host, port: String(nbd.port) },
      export: exportName,
      ...(tls ? { 'tls-creds': 'tls0' } : {}),
    }),
    '--blockdev',
    JSON.stringify({ driver: 'file', 'node-name': `f${i}`, filename: overlay, 'read-only': readOnly }),
    '--blockdev',
    JSON.stringify({ driver: 'qcow2', 'node-name': `o${i}`, file: `f${i}`, backing: `s${i}`, 'read-only': readOnly }),
  ];
}

export function tlsArgs(opts: HostMountOptions): string[] {
  if (!opts.nbd.tls) return [];
  if (!opts.tlsDir)
    throw new TidemarkError(
      'NOT_SUPPORTED',
      "the host's NBD requires TLS: the 2008r2 and 2012r2 flows need --nbd-tls-dir",
    );
  // QEMU reads the same file names (ca-cert.pem, client-cert.pem, client-key.pem) from the directory.
  return [
    '--object',
    JSON.stringify({ 'qom-type': 'tls-creds-x509', id: 'tls0', dir: opts.tlsDir, endpoint: 'client' }),
  ];
}

export async function startDaemon(args: string[], pidFile: string): Promise<void> {
  try {
    // --daemonize: returns once every block device and export is up (or failed).
    await run('qemu-storage-daemon', ['--daemonize', '--pidfile', pidFile, ...args]);
  } catch (err) {
    const e = err as { stderr?: string; message: string; code?: string };
    if (e.code === 'ENOENT')
      throw new TidemarkError(
        'NOT_SUPPORTED',
        'the 2008r2 and 2012r2 flows need qemu-storage-daemon (QEMU) on this machine',
      );
    throw new TidemarkError(
      'QEMU_FAILED',
      `auto-recovery: qemu-storage-daemon failed: ${(e.stderr || e.message).trim()}`,
    );
  }
}

export async function stopDaemon(pidFile: string): Promise<void> {
  const pid = Number((await readFile(pidFile, 'utf8').catch(() => '')).trim());
  if (await exited(pid)) return;
  process.kill(pid, 'SIGTERM');
  // Its FUSE views are unmounted and its overlays closed once it has exited.
  for (let i = 0; i < 1000 && !(await exited(pid)); i++) await new Promise((r) => setTimeout(r, 5));
  if (!(await exited(pid))) process.kill(pid, 'SIGKILL');
}

/**
 * Gone, or exited and not yet reaped: a daemonized process is init's child, and a container's init may reap
 * it only a second later (a zombie has closed its files and unmounted its views already).
 */
async function exited(pid: number): Promise<boolean> {
  if (!pidAlive(pid)) return true;
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => '');
  return / Z /.test(stat.slice(stat.lastIndexOf(')')));
}

/** `e2fsck -p` on the raw view: the journal replayed and what it may fix unattended fixed; anything else fails. */
async function recoverExt(file: string): Promise<string> {
  const t = performance.now();
  let status = 0;
  let out = '';
  try {
    ({ stdout: out } = await run('e2fsck', ['-p', file]));
  } catch (err) {
    const e = err as { code?: number | string; stdout?: string; stderr?: string; message: string };
    if (e.code === 'ENOENT') throw new TidemarkError('NOT_SUPPORTED', 'auto-recovery needs e2fsck (e2fsprogs)');
    status = typeof e.code === 'number' ? e.code : 8;
    out = `${e.stdout ?? ''}${e.stderr ?? ''}`;
    // 1: errors corrected, 2: corrected (a mounted system would reboot); 4 and above: not recovered.
    if (status >= 4)
      throw new TidemarkError(
        'IO_ERROR',
        `auto-recovery: e2fsck -p could not recover the file system (status ${status}): ${out.trim()}`,
      );
  }
  const ms = (performance.now() - t).toFixed(0);
  const replayed = /recovering journal/i.test(out);
  const what = `${replayed ? 'journal replayed, ' : ''}${status === 0 ? 'clean' : 'errors corrected'}`;
  return `e2fsck -p ${what} in ${ms} ms`;
}

/**
 * The ext2/3/4 file systems of a disk, read through the snapshot's export: on the whole disk, or in its MBR
 * primary partitions or GPT partitions (512-byte sectors).
 */
export async function probeFileSystems(
  nbd: HostMountOptions['nbd'],
  exportName: string,
  size: number,
): Promise<FoundFileSystem[]> {
  const client = await NbdClient.connect({ ...nbd, exportName });
  try {
    const read = async (offset: number, length: number) =>
      offset + length <= size ? client.read(offset, length) : Buffer.alloc(0);
    const isExt = async (offset: number) => {
      const sb = await read(offset + 1024, 1024);
      return sb.length === 1024 && sb.readUInt16LE(56) === 0xef53;
    };
    if (await isExt(0)) return [{ type: 'ext', offset: 0, length: size, where: 'disk' }];
    const head = await read(0, 1024);
    if (head.length < 1024 || head[510] !== 0x55 || head[511] !== 0xaa) return [];
    const found: FoundFileSystem[] = [];
    const consider = async (start: number, end: number, where: string) => {
      if (start > 0 && end > start && end <= size && (await isExt(start)))
        found.push({ type: 'ext', offset: start, length: end - start, where });
    };
    if (head.subarray(512, 520).toString('latin1') === 'EFI PART') {
      const entriesLba = Number(head.readBigUInt64LE(512 + 72));
      const count = Math.min(head.readUInt32LE(512 + 80), 128);
      const entrySize = head.readUInt32LE(512 + 84);
      if (entrySize < 128 || entrySize > 4096) return [];
      const table = await read(entriesLba * 512, count * entrySize);
      for (let i = 0; i * entrySize + 128 <= table.length; i++) {
        const e = table.subarray(i * entrySize, i * entrySize + 128);
        if (e.subarray(0, 16).every((b) => b === 0)) continue;
        const first = Number(e.readBigUInt64LE(32));
        const last = Number(e.readBigUInt64LE(40));
        await consider(first * 512, (last + 1) * 512, `gpt ${i + 1}`);
      }
      return found;
    }
    for (let i = 0; i < 4; i++) {
      const e = head.subarray(446 + 16 * i, 462 + 16 * i);
      if (e[4] === 0 || e[4] === 0x05 || e[4] === 0x0f) continue;
      const start = e.readUInt32LE(8) * 512;
      await consider(start, start + e.readUInt32LE(12) * 512, `mbr ${i + 1}`);
    }
    return found;
  } finally {
    await client.close();
  }
}
