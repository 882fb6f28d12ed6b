/**
 * The Debian peer tools as test oracles: qemu-img/qemu-io (qemu-utils), 7zz (7zip), vhdimount
 * (libvhdi-utils). A missing peer skips its tests with one loud line, or fails them in CI
 * (TIDEMARK_REQUIRE_PEERS=1, set by scripts/test.sh when CI=true).
 */
import { execFile, spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, createWriteStream, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { mkdir, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);
const cache = new Map<string, boolean>();

export function hasPeer(name: string): boolean {
  if (!cache.has(name)) {
    const r = spawnSync('sh', ['-c', `command -v ${name} || test -x /usr/sbin/${name}`], { stdio: 'ignore' });
    cache.set(name, r.status === 0);
  }
  return cache.get(name)!;
}

/** For `describe.skipIf(missingPeers(...))`: true (skip) when a peer is missing outside CI. */
export function missingPeers(...names: string[]): boolean {
  const missing = names.filter((n) => !hasPeer(n));
  if (missing.length === 0) return false;
  const line = `PEER MISSING: ${missing.join(', ')} (install: sudo bash scripts/install-peers.sh)`;
  if (process.env.TIDEMARK_REQUIRE_PEERS === '1') throw new Error(`${line}; CI requires every peer`);
  console.warn(line);
  return true;
}

export async function run(
  cmd: string,
  args: string[],
  opts: { allowFail?: boolean } = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await execFileP(cmd, args, { maxBuffer: 64 * 1024 * 1024 });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    if (!opts.allowFail)
      throw new Error(`${cmd} ${args.join(' ')} failed (${e.code}): ${e.stderr ?? ''}${e.stdout ?? ''}`);
    return { code: typeof e.code === 'number' ? e.code : 1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

export async function qemuImgCheck(file: string): Promise<{ ok: boolean; output: string }> {
  const r = await run('qemu-img', ['check', '-f', 'vhdx', file], { allowFail: true });
  return { ok: r.code === 0, output: r.stdout + r.stderr };
}

export async function qemuImgCompare(
  a: string,
  fmtA: string,
  b: string,
  fmtB: string,
): Promise<{ identical: boolean; output: string }> {
  const r = await run('qemu-img', ['compare', '-f', fmtA, '-F', fmtB, a, b], { allowFail: true });
  if (r.code > 1) throw new Error(`qemu-img compare failed: ${r.stderr}`);
  return { identical: r.code === 0, output: r.stdout + r.stderr };
}

export async function qemuImgCreateVhdx(
  file: string,
  size: number,
  opts: { subformat: 'dynamic' | 'fixed'; blockSize?: number },
): Promise<void> {
  const o = [`subformat=${opts.subformat}`];
  if (opts.blockSize) o.push(`block_size=${opts.blockSize}`);
  await run('qemu-img', ['create', '-q', '-f', 'vhdx', '-o', o.join(','), file, String(size)]);
}

export async function qemuIoWrite(
  file: string,
  writes: { offset: number; length: number; pattern: number }[],
): Promise<void> {
  const args = ['-f', 'vhdx'];
  for (const w of writes) args.push('-c', `write -P 0x${w.pattern.toString(16)} ${w.offset} ${w.length}`);
  args.push(file);
  const r = await run('qemu-io', args);
  if (/error|failed/i.test(r.stdout + r.stderr)) throw new Error(`qemu-io reported: ${r.stdout}${r.stderr}`);
}

export async function qemuImgToRaw(src: string, fmt: string, dst: string): Promise<void> {
  await run('qemu-img', ['convert', '-f', fmt, '-O', 'raw', src, dst]);
}

/** 7-Zip's view of a VHDX (it resolves a differencing disk's parent beside it): the raw content, in a file. */
export async function sevenZipExtract(file: string, dst: string): Promise<void> {
  const child = spawn('7zz', ['e', '-so', file], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  const exited = new Promise<number | null>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', resolve);
  });
  await pipeline(child.stdout, createWriteStream(dst));
  const code = await exited;
  if (code !== 0) throw new Error(`7zz e -so ${file} exited ${code}: ${stderr.trim()}`);
}

/**
 * libvhdi's view (vhdimount over FUSE; parents are found by name beside the file): the raw content, in a
 * file. For a chain vhdimount exposes every level, vhdi1 (the base) to vhdiN (the file given): take vhdiN.
 */
export async function vhdiExtract(file: string, dst: string): Promise<void> {
  const mnt = mkdtempSync(path.join(os.tmpdir(), 'vhdimnt-'));
  try {
    await run('vhdimount', [file, mnt]);
    try {
      const levels = readdirSync(mnt).filter((n) => /^vhdi\d+$/.test(n));
      const top = levels.sort((a, b) => Number(a.slice(4)) - Number(b.slice(4))).at(-1);
      if (!top) throw new Error(`vhdimount ${file} exposed nothing`);
      await pipeline(createReadStream(path.join(mnt, top)), createWriteStream(dst));
    } finally {
      await run('umount', [mnt], { allowFail: true });
    }
  } finally {
    rmSync(mnt, { recursive: true, force: true });
  }
}

export async function sha256File(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(file)) h.update(chunk as Buffer);
  return h.digest('hex');
}

export async function tempDir(prefix: string): Promise<{ dir: string; cleanup: () => Promise<void> }> {
  const dir = mkdtempSync(path.join(os.tmpdir(), `tidemark-${prefix}-`));
  await mkdir(dir, { recursive: true });
  return { dir, cleanup: () => rm(dir, { recursive: true, force: true }) };
}
