/**
 * The Debian peer tools as independent test oracles (VHDX-NOTES.md §3): qemu-img/qemu-io (qemu-utils),
 * 7zz (7zip), libvhdi (vhdimount/vhdiinfo from libvhdi-utils, or pyvhdi from python3-libvhdi).
 * A missing peer skips its tests with one loud line, or fails them when TIDEMARK_REQUIRE_PEERS=1
 * (set by scripts/test.sh when CI=true). `sudo bash scripts/install-peers.sh` installs them all.
 *
 * Big outputs (whole virtual disks) always go to files, never into memory.
 */
import { execFile, spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  accessSync,
  constants,
  createReadStream,
  createWriteStream,
  mkdtempSync,
  readFileSync,
  readdirSync,
  rmSync,
  statSync,
} from 'node:fs';
import { rm, rmdir } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll } from 'vitest';
import { sleep } from './async.js';

const execFileP = promisify(execFile);
const INSTALL_HINT = 'install: sudo bash scripts/install-peers.sh';

// ---------------------------------------------------------------------------------------------------
// Which peers exist

const found = new Map<string, boolean>();

/** An executable on PATH, or in /usr/sbin and /sbin (qemu-ga lives there; a non-root PATH may lack them). */
function onPath(cmd: string): boolean {
  const dirs = [...(process.env.PATH ?? '').split(path.delimiter), '/usr/sbin', '/sbin'];
  return dirs.some((d) => {
    if (!d) return false;
    try {
      const p = path.join(d, cmd);
      accessSync(p, constants.X_OK);
      return statSync(p).isFile();
    } catch {
      return false;
    }
  });
}

/**
 * Whether vhdimount can mount here: it needs /dev/fuse, and either fusermount (setuid helper) or
 * CAP_SYS_ADMIN so libfuse can call mount(2) itself (root outside a restricted container).
 */
function fuseMountable(): boolean {
  try {
    accessSync('/dev/fuse', constants.R_OK | constants.W_OK);
  } catch {
    return false;
  }
  if (onPath('fusermount') || onPath('fusermount3')) return true;
  const capEff = /^CapEff:\s*([0-9a-f]+)$/m.exec(readFileSync('/proc/self/status', 'utf8'));
  const CAP_SYS_ADMIN = 21n;
  return capEff !== null && ((BigInt(`0x${capEff[1]}`) >> CAP_SYS_ADMIN) & 1n) === 1n;
}

let pyvhdiPython: string | null | undefined;
/** A python that can `import pyvhdi`: Debian installs it for /usr/bin/python3, not for pyenv/venv pythons. */
function pythonWithPyvhdi(): string | null {
  if (pyvhdiPython === undefined) {
    pyvhdiPython =
      ['/usr/bin/python3', 'python3'].find(
        (py) => spawnSync(py, ['-c', 'import pyvhdi'], { stdio: 'ignore' }).status === 0,
      ) ?? null;
  }
  return pyvhdiPython;
}

/**
 * Whether a peer is usable (cached). Names are commands (`qemu-img`, `7zz`, `vhdiinfo`, `bzip2`, ...),
 * plus: `vhdimount` (the command AND a mountable FUSE), `pyvhdi` (the python binding of libvhdi), and
 * `libvhdi` (either of those two: what vhdiRead needs).
 */
export function peer(name: string): boolean {
  let ok = found.get(name);
  if (ok === undefined) {
    if (name === 'vhdimount') ok = onPath('vhdimount') && fuseMountable();
    else if (name === 'pyvhdi') ok = pythonWithPyvhdi() !== null;
    else if (name === 'libvhdi') ok = peer('vhdimount') || peer('pyvhdi');
    else ok = onPath(name);
    found.set(name, ok);
  }
  return ok;
}
/** Older name of `peer`. */
export const hasPeer = peer;

/**
 * For `describe.skipIf(requirePeers('qemu-img', '7zz').skip)(...)`. When a peer is missing, prints one
 * loud line and skips; with TIDEMARK_REQUIRE_PEERS=1 (CI) it throws, so the test file fails instead.
 */
export function requirePeers(...names: string[]): { skip: boolean; reason: string } {
  const missing = names.filter((n) => !peer(n));
  if (missing.length === 0) return { skip: false, reason: '' };
  const reason = `PEER MISSING: ${missing.join(', ')} (${INSTALL_HINT})`;
  if (process.env.TIDEMARK_REQUIRE_PEERS === '1')
    throw new Error(`${reason}; TIDEMARK_REQUIRE_PEERS=1 forbids skipping`);
  console.warn(reason);
  return { skip: true, reason };
}
/** `requirePeers(...).skip`, for `describe.skipIf(missingPeers(...))`. */
export function missingPeers(...names: string[]): boolean {
  return requirePeers(...names).skip;
}

// ---------------------------------------------------------------------------------------------------
// Running them

/** Runs a command to completion; throws (with its stderr) on a non-zero exit unless allowFail. */
export async function run(
  cmd: string,
  args: string[],
  opts: { allowFail?: boolean; timeoutMs?: number } = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await execFileP(cmd, args, { maxBuffer: 256 * 1024 * 1024, timeout: opts.timeoutMs });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: number | string; signal?: string; stdout?: string; stderr?: string };
    if (!opts.allowFail || typeof e.code !== 'number')
      throw new Error(`${cmd} ${args.join(' ')} failed (${e.code ?? e.signal}): ${e.stderr ?? ''}${e.stdout ?? ''}`);
    return { code: e.code, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

/** Runs a command whose stdout is a whole disk, streaming it into `dst`; removes `dst` on failure. */
async function runToFile(cmd: string, args: string[], dst: string): Promise<void> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (d: string) => {
    if (stderr.length < 65536) stderr += d;
  });
  const exited = new Promise<number | null>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', resolve);
  });
  try {
    const [, code] = await Promise.all([pipeline(child.stdout, createWriteStream(dst)), exited]);
    if (code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${code}: ${stderr.trim()}`);
  } catch (err) {
    await rm(dst, { force: true });
    throw err;
  }
}

let scratch: string | undefined;
let scratchCount = 0;
function removeScratch(): void {
  if (scratch) rmSync(scratch, { recursive: true, force: true });
  scratch = undefined;
}
// Vitest ends its fork workers without an 'exit' event: clean up after each test file importing this.
afterAll(removeScratch);
process.on('exit', removeScratch);

/** Where outputs go when the caller names no destination; removed after the test file. */
function scratchFile(tag: string, src: string): string {
  scratch ??= mkdtempSync(path.join(os.tmpdir(), 'tidemark-peers-'));
  return path.join(scratch, `${++scratchCount}-${path.basename(src)}.${tag}.raw`);
}

// ---------------------------------------------------------------------------------------------------
// qemu-utils

/** `qemu-img check -f vhdx`: exit 0 means clean (2 = corruptions, 3 = leaks). */
export async function qemuImgCheck(file: string): Promise<{ ok: boolean; output: string }> {
  const r = await run('qemu-img', ['check', '-f', 'vhdx', file], { allowFail: true });
  return { ok: r.code === 0, output: r.stdout + r.stderr };
}

/**
 * `qemu-img compare -f fmtA -F fmtB a b`: exit 0 identical, 1 different, 2+ error (thrown). Not strict
 * (-s): that would also fail on allocation differences, and our images have equal sizes anyway.
 */
export async function qemuImgCompare(
  a: string,
  fmtA: string,
  b: string,
  fmtB: string,
): Promise<{ identical: boolean; output: string }> {
  const r = await run('qemu-img', ['compare', '-f', fmtA, '-F', fmtB, a, b], { allowFail: true });
  if (r.code > 1) throw new Error(`qemu-img compare ${a} ${b} failed (${r.code}): ${r.stderr}${r.stdout}`);
  return { identical: r.code === 0, output: r.stdout + r.stderr };
}

/** `qemu-img create -f vhdx -o subformat=...,block_size=...`. QEMU writes 512-byte logical sectors only. */
export async function qemuImgCreateVhdx(
  file: string,
  sizeBytes: number,
  opts: { subformat: 'dynamic' | 'fixed'; blockSizeBytes?: number; /** older name */ blockSize?: number },
): Promise<void> {
  const o = [`subformat=${opts.subformat}`];
  const bs = opts.blockSizeBytes ?? opts.blockSize;
  if (bs) o.push(`block_size=${bs}`);
  await run('qemu-img', ['create', '-q', '-f', 'vhdx', '-o', o.join(','), file, String(sizeBytes)]);
}

export interface PatternWrite {
  offset: number;
  length: number;
  /** the byte value written over the whole range */
  pattern: number;
}

/**
 * Writes byte patterns with one `qemu-io -f <fmt> -c 'write -P ..' -c ...` run. qemu-io goes on after a
 * failed command and (7.2) exits 1 at the end; older ones exit 0, hence the check of the output too.
 */
export async function qemuIoWrite(file: string, fmt: string, writes: PatternWrite[]): Promise<string>;
/** Older form: format vhdx. */
export async function qemuIoWrite(file: string, writes: PatternWrite[]): Promise<string>;
export async function qemuIoWrite(
  file: string,
  fmtOrWrites: string | PatternWrite[],
  maybeWrites?: PatternWrite[],
): Promise<string> {
  const [fmt, writes] = typeof fmtOrWrites === 'string' ? [fmtOrWrites, maybeWrites ?? []] : ['vhdx', fmtOrWrites];
  const args = ['-f', fmt];
  for (const w of writes) {
    if (!Number.isInteger(w.pattern) || w.pattern < 0 || w.pattern > 255) throw new Error(`bad pattern ${w.pattern}`);
    args.push('-c', `write -P 0x${w.pattern.toString(16)} ${w.offset} ${w.length}`);
  }
  args.push(file);
  const r = await run('qemu-io', args);
  const out = r.stdout + r.stderr;
  if (/error|failed/i.test(out)) throw new Error(`qemu-io ${file} reported: ${out}`);
  return out;
}

/** `qemu-img convert -f <srcFmt> -O raw`: qemu's reading of a disk, as a raw file. */
export async function qemuImgConvertToRaw(src: string, srcFmt: string, dstRaw: string): Promise<void> {
  await run('qemu-img', ['convert', '-f', srcFmt, '-O', 'raw', src, dstRaw]);
}
/** Older name of `qemuImgConvertToRaw`. */
export const qemuImgToRaw = qemuImgConvertToRaw;

// ---------------------------------------------------------------------------------------------------
// 7-Zip

/**
 * 7-Zip's reading of a VHDX: `7zz e -so -tvhdx -bd <file>` streams the whole virtual disk (one item,
 * named `<base>.img`, or `<base>.mbr` etc. when it recognises a partition table) to stdout; returns the
 * path of the raw file (`dst`, or a scratch file).
 *
 * What we found (7zz 26.02, Debian 7zip 22.01+really26.02):
 * - `-tvhdx` is required: without it 7zz descends into the disk content (for Disk2vhd's image: MBR,
 *   then FAT), fails to open the inner archive and exits 2 with nothing written.
 * - A differencing disk opens its parent from the child's directory (it reports `Parent = .\base.vhdx`,
 *   the relative_path locator key) and checks parent_linkage against the parent's DataWriteGuid: a
 *   missing parent ("Missing parent VHDX file") or a wrong one exits 2, reported with -so only as
 *   "Unsupported Method"; `7zz l -tvhdx` shows the real reason. The output is the whole chain's view.
 * - It refuses a virtual size that is not a multiple of 4 KiB (exit 2), even for files qemu-img made.
 * - It does not replay the log and wants both headers valid (VHDX-NOTES.md §3).
 * - Exit codes: 0 ok, 1 warning, 2 fatal; we accept only 0. A trailing partial sector (Disk2vhd) is a
 *   listing warning only ("data after the end of archive") and still exits 0.
 */
export async function sevenZipExtract(file: string, dst?: string): Promise<string> {
  const out = dst ?? scratchFile('7z', file);
  await runToFile('7zz', ['e', '-so', '-tvhdx', '-bd', file], out);
  return out;
}

// ---------------------------------------------------------------------------------------------------
// libvhdi

const PYVHDI_SCRIPT = fileURLToPath(new URL('./vhdi-read.py', import.meta.url));

/** How vhdiRead reaches libvhdi: vhdimount when FUSE works here, else pyvhdi. TIDEMARK_VHDI_READER forces one. */
export function vhdiReader(): 'vhdimount' | 'pyvhdi' | null {
  const forced = process.env.TIDEMARK_VHDI_READER;
  if (forced === 'vhdimount' || forced === 'pyvhdi') return forced;
  return peer('vhdimount') ? 'vhdimount' : peer('pyvhdi') ? 'pyvhdi' : null;
}

/**
 * libvhdi's reading of a VHDX (fixed, dynamic, differencing; it ignores the log): the path of a raw file
 * (`dst`, or a scratch file). Both routes find a parent the way vhdimount does: the basename of the
 * child's parent filename (libvhdi reports the absolute_win32_path key, e.g. `\\?\Z:\...\base.vhdx`),
 * looked up in the child's directory; the parent_linkage must equal the parent's DataWriteGuid
 * ("libvhdi_file_set_parent_file: mismatch in identifier" otherwise).
 *
 * vhdimount exposes one file per chain level in the mount point: vhdi1 is the base, vhdiN the file
 * named (its view through the chain); we copy vhdiN. pyvhdi (vhdi-read.py) is the same library without
 * FUSE, and about twice as fast.
 */
export async function vhdiRead(
  file: string,
  dst?: string,
  opts: { via?: 'vhdimount' | 'pyvhdi' } = {},
): Promise<string> {
  const out = dst ?? scratchFile('vhdi', file);
  const via = opts.via ?? vhdiReader();
  if (via === 'pyvhdi') {
    const py = pythonWithPyvhdi();
    if (!py) throw new Error(`pyvhdi is not importable (${INSTALL_HINT})`);
    await runToFile(py, [PYVHDI_SCRIPT, file], out);
  } else if (via === 'vhdimount') {
    await viaVhdimount(file, out);
  } else {
    throw new Error(`PEER MISSING: libvhdi (no usable FUSE for vhdimount, no pyvhdi) (${INSTALL_HINT})`);
  }
  return out;
}
/** Older form of `vhdiRead`. */
export async function vhdiExtract(file: string, dst: string): Promise<void> {
  await vhdiRead(file, dst);
}

async function viaVhdimount(file: string, dst: string): Promise<void> {
  const mnt = mkdtempSync(path.join(os.tmpdir(), 'tidemark-vhdimnt-'));
  try {
    // vhdimount daemonises once the FUSE mount is up, so the mount is ready when it returns.
    await run('vhdimount', [file, mnt], { timeoutMs: 60_000 });
    try {
      const levels = readdirSync(mnt).filter((n) => /^vhdi\d+$/.test(n));
      const top = levels.sort((a, b) => Number(a.slice(4)) - Number(b.slice(4))).at(-1);
      if (!top) throw new Error(`vhdimount ${file} exposed nothing`);
      try {
        await pipeline(createReadStream(path.join(mnt, top), { highWaterMark: 4 << 20 }), createWriteStream(dst));
      } catch (err) {
        await rm(dst, { force: true });
        throw err;
      }
    } finally {
      await unmount(mnt);
    }
  } finally {
    await rmdir(mnt).catch(() => {}); // rmdir, never rm -r: if the unmount failed this is still a mount
  }
}

async function unmount(mnt: string): Promise<void> {
  // Non-root needs fusermount (package fuse/fuse3); root may lack it and uses umount.
  const cmd = ['fusermount', 'fusermount3'].find(onPath);
  const args = cmd ? ['-u', mnt] : [mnt];
  let last = '';
  for (let attempt = 0; attempt < 10; attempt++) {
    const r = await run(cmd ?? 'umount', args, { allowFail: true });
    if (r.code === 0) return;
    last = r.stderr;
    await sleep(200); // EBUSY right after the last read
  }
  throw new Error(`could not unmount ${mnt}: ${last}`);
}

/** `vhdiinfo <file>` output. Its "Identifier" is the DataWriteGuid, not the VirtualDiskId. */
export async function vhdiInfo(file: string): Promise<string> {
  return (await run('vhdiinfo', [file])).stdout;
}

// ---------------------------------------------------------------------------------------------------
// Files

export async function sha256File(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(file, { highWaterMark: 4 << 20 })) h.update(chunk as Buffer);
  return h.digest('hex');
}

/** A new directory under os.tmpdir(); call `cleanup` (e.g. in afterAll) to remove it. */
export async function tempDir(prefix: string): Promise<{ dir: string; cleanup: () => Promise<void> }> {
  const dir = mkdtempSync(path.join(os.tmpdir(), `tidemark-${prefix}-`));
  return { dir, cleanup: () => rm(dir, { recursive: true, force: true }) };
}
