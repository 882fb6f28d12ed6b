/**
 * Debian packages without root: what apt knows about a package (`apt-cache show`), fetching .deb files
 * (`apt-get download`) into a cache, and unpacking them (`dpkg-deb -x`) once per version. Everything is
 * keyed by name and version, so a warm cache costs no download and no extraction.
 */
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, readdir, rename, rm, stat, writeFile, access } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { TidemarkError } from '../errors.js';

const execFileP = promisify(execFile);
const EXTRACTED_MARK = '.tidemark-extracted';

export interface PackageInfo {
  name: string;
  version: string;
  architecture: string;
  /** Depends and Pre-Depends: the first alternative of each, without version constraints */
  depends: string[];
  /** the .deb's size in bytes, as the archive says */
  size: number;
}

/**
 * The candidate versions apt would install, from ONE `apt-cache show --no-all-versions` (each call costs
 * seconds on a loaded machine). Names apt does not know (virtual packages) are simply absent from the map.
 */
export async function packageInfos(names: string[]): Promise<Map<string, PackageInfo>> {
  const out = new Map<string, PackageInfo>();
  if (names.length === 0) return out;
  for (const name of names) {
    if (!/^[a-z0-9][a-z0-9.+-]+$/.test(name)) {
      throw new TidemarkError('INVALID_ARGUMENT', `"${name}" is not a Debian package name`);
    }
  }
  let text: string;
  try {
    text = (await execFileP('apt-cache', ['show', '--no-all-versions', ...names], { maxBuffer: 64 << 20 })).stdout;
  } catch (err) {
    const e = err as { code?: string | number; stderr?: string; stdout?: string };
    if (e.code === 'ENOENT') {
      throw new TidemarkError('NOT_FOUND', 'apt-cache is not installed: building a guest image needs apt (Debian)');
    }
    text = e.stdout ?? ''; // none of the names is known: apt-cache fails, the map stays empty
  }
  for (const stanza of text.split(/\n\s*\n/)) {
    if (!stanza.trim()) continue;
    const p = parseControl(stanza, '(apt-cache output)');
    if (names.includes(p.name) && !out.has(p.name)) out.set(p.name, p);
  }
  return out;
}

/** One package's candidate; NOT_FOUND when apt does not know it. */
export async function packageInfo(name: string): Promise<PackageInfo> {
  const p = (await packageInfos([name])).get(name);
  if (!p) throw new TidemarkError('NOT_FOUND', `apt does not know the package ${name}; run apt-get update`);
  return p;
}

/**
 * What apt's package lists look like now (names, sizes, times): a resolution made under the same lists
 * gives the same versions, so a warm build can skip apt-cache entirely.
 */
export async function aptListsStamp(dir = '/var/lib/apt/lists'): Promise<string> {
  const names = (await readdir(dir).catch(() => [] as string[]))
    .filter((n) => n.endsWith('_Packages') || n.includes('_Packages.'))
    .sort();
  const parts: string[] = [];
  for (const n of names) {
    const st = await stat(path.join(dir, n)).catch(() => undefined);
    if (st) parts.push(`${n}:${st.size}:${st.mtimeMs}`);
  }
  return parts.join('|');
}

/** Parses one `apt-cache show` stanza (the first, which is the candidate with --no-all-versions). */
export function parseControl(text: string, name: string): PackageInfo {
  const stanza = text.split(/\n\n/)[0];
  const fields = new Map<string, string>();
  let key: string | undefined;
  for (const line of stanza.split('\n')) {
    if (/^\s/.test(line) && key) fields.set(key, fields.get(key)! + '\n' + line.trim());
    else {
      const i = line.indexOf(':');
      if (i <= 0) continue;
      key = line.slice(0, i);
      fields.set(key, line.slice(i + 1).trim());
    }
  }
  const version = fields.get('Version');
  if (!fields.get('Package') || !version) {
    throw new TidemarkError('NOT_FOUND', `apt has no installable version of ${name}; run apt-get update`);
  }
  const depends: string[] = [];
  for (const f of ['Pre-Depends', 'Depends']) {
    for (const clause of (fields.get(f) ?? '').split(',')) {
      const first = clause
        .split('|')[0]
        .trim()
        .split(/[\s(:]/)[0];
      if (first && !depends.includes(first)) depends.push(first);
    }
  }
  return {
    name: fields.get('Package')!,
    version,
    architecture: fields.get('Architecture') ?? 'amd64',
    depends,
    size: Number(fields.get('Size') ?? 0),
  };
}

/** The file name apt-get download gives a package (the epoch's ':' is written %3a). */
export function debFileName(p: PackageInfo): string {
  return `${p.name}_${p.version.replace(/:/g, '%3a')}_${p.architecture}.deb`;
}

/**
 * Makes sure each package's .deb is in `debDir`, downloading the missing ones in one `apt-get download`
 * (into a private temporary folder first, so concurrent builds never see half a file). Returns how many
 * were downloaded.
 */
export async function ensureDownloaded(pkgs: PackageInfo[], debDir: string): Promise<number> {
  await mkdir(debDir, { recursive: true });
  const missing: PackageInfo[] = [];
  for (const p of pkgs) if (!(await exists(path.join(debDir, debFileName(p))))) missing.push(p);
  if (missing.length === 0) return 0;
  const tmp = await mkdtemp(path.join(debDir, '.download-'));
  try {
    try {
      await execFileP('apt-get', ['download', '-q', ...missing.map((p) => `${p.name}=${p.version}`)], {
        cwd: tmp,
        maxBuffer: 16 << 20,
      });
    } catch (err) {
      const e = err as { code?: string | number; stderr?: string };
      throw new TidemarkError(
        'IO_ERROR',
        e.code === 'ENOENT'
          ? 'apt-get is not installed: building a guest image needs apt (Debian)'
          : `apt-get download ${missing.map((p) => p.name).join(' ')} failed: ${lastLines(e.stderr ?? '')}`,
      );
    }
    for (const p of missing) {
      const f = debFileName(p);
      try {
        await rename(path.join(tmp, f), path.join(debDir, f));
      } catch {
        const got = (await readdir(tmp)).join(', ') || 'nothing';
        throw new TidemarkError('IO_ERROR', `apt-get download did not produce ${f} (got ${got})`);
      }
    }
    return missing.length;
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}

/** Unpacks a .deb once (`dpkg-deb -x`) into `dir` (kept: the marker says it is complete). */
export async function ensureExtracted(deb: string, dir: string): Promise<boolean> {
  if (await exists(path.join(dir, EXTRACTED_MARK))) return false;
  await mkdir(path.dirname(dir), { recursive: true });
  const tmp = await mkdtemp(`${dir}.tmp-`);
  try {
    try {
      await execFileP('dpkg-deb', ['-x', deb, tmp], { maxBuffer: 16 << 20 });
    } catch (err) {
      const e = err as { code?: string | number; stderr?: string };
      throw new TidemarkError(
        'IO_ERROR',
        e.code === 'ENOENT'
          ? 'dpkg-deb is not installed: building a guest image needs dpkg (Debian)'
          : `dpkg-deb -x ${deb} failed: ${lastLines(e.stderr ?? '')}`,
      );
    }
    await writeFile(path.join(tmp, EXTRACTED_MARK), `${path.basename(deb)}\n`);
    await rm(dir, { recursive: true, force: true });
    try {
      await rename(tmp, dir);
    } catch (err) {
      // Another build unpacked the same version meanwhile: theirs is as good as ours.
      if (!(await exists(path.join(dir, EXTRACTED_MARK)))) throw err;
    }
    return true;
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}

export async function fileSize(p: string): Promise<number> {
  return (await stat(p)).size;
}

function lastLines(s: string): string {
  return s.trim().split('\n').slice(-3).join(' / ');
}

async function exists(p: string): Promise<boolean> {
  return access(p).then(
    () => true,
    () => false,
  );
}
