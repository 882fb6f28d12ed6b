/**
 * `tidemark guest-image build`: a small Linux guest from Debian packages, without root. The kernel, busybox,
 * qemu-guest-agent, sqlite3 and e2fsprogs are fetched with `apt-get download` and unpacked with `dpkg-deb -x`
 * into a cache; the shared libraries their binaries need are found from the binaries themselves (DT_NEEDED,
 * followed transitively) and fetched from the packages' dependencies until nothing is missing; the kernel
 * modules the guest needs are ordered by their `.modinfo` dependencies. Out come `vmlinux` (the decompressed
 * kernel, booted directly through PVH), `initrd.img` (cpio newc, written here) and `manifest.json`.
 *
 * Idempotent: the output is keyed by the package versions and the scripts; a build whose key matches the
 * manifest in the output folder rewrites nothing. Downloads and unpacked packages are cached per version.
 */
import { createHash } from 'node:crypto';
import { lstat, mkdir, readdir, readFile, readlink, rename, rm, stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { TidemarkError } from '../errors.js';
import { writeFileAtomic } from '../util/atomic.js';
import {
  aptListsStamp,
  debFileName,
  ensureDownloaded,
  ensureExtracted,
  fileSize,
  packageInfos,
  type PackageInfo,
} from './apt.js';
import { extractVmlinux, locatePayload } from './bzimage.js';
import { decodeNewc, NewcWriter } from './cpio.js';
import { elfInterpreter, elfNeeded, isElf, moduleInfo } from './elf.js';
import {
  actionScript,
  defaultCmdline,
  freezeHookScript,
  initScript,
  shutdownScript,
  stopGuestScript,
  workloadScript,
  WORKLOADS,
  type ScriptPaths,
} from './scripts.js';

/** Bump when the image's layout or scripts change in a way the key would not see. */
export const BUILDER_VERSION = 1;
export const MANIFEST_FORMAT = 1;

const KERNEL_META = 'linux-image-amd64';
/** The packages whose programs the guest runs (all their files but documentation go in). */
export const TOOL_PACKAGES = ['busybox-static', 'qemu-guest-agent', 'sqlite3', 'e2fsprogs'] as const;
/**
 * Modules the guest loads, with their dependencies: virtio transport, disks (virtio-blk, virtio-scsi and
 * IDE through ata_piix for generation 1, sd_mod for SCSI/ATA disks), the agent's virtio-serial port, ext4 and
 * the crc32c it asks the crypto API for (request_module is not available: no modprobe), and pvpanic so a
 * kernel panic reaches the host as GUEST_PANICKED. Optional ones may be built in or absent.
 */
export const WANTED_MODULES = [
  'virtio_pci',
  'virtio_blk',
  'virtio_scsi',
  'sd_mod',
  'virtio_console',
  'crc32c_generic',
  'ext4',
];
export const OPTIONAL_MODULES = ['ata_piix', 'pvpanic_mmio', 'pvpanic_pci'];

const LIB_DIRS = ['/lib/x86_64-linux-gnu', '/usr/lib/x86_64-linux-gnu', '/lib64', '/usr/lib64', '/lib', '/usr/lib'];
/** Never copied into the image: documentation, init-system glue. */
const SKIP_PREFIXES = [
  '/usr/share/doc',
  '/usr/share/man',
  '/usr/share/info',
  '/usr/share/locale',
  '/usr/share/lintian',
  '/usr/share/bug',
  '/usr/share/bash-completion',
  '/etc/init.d',
  '/lib/systemd',
  '/usr/lib/systemd',
  '/lib/udev',
  '/etc/cron.d',
  '/etc/logrotate.d',
];
const MAX_CLOSURE_ROUNDS = 12;

export interface BuildOptions {
  /** Output folder (default: `defaultImageDir()`). */
  outDir?: string;
  /** Cache of .deb files and unpacked packages (default: `defaultCacheDir()`). */
  cacheDir?: string;
  /** Rebuild even when the output is up to date. */
  force?: boolean;
  log?: (line: string) => void;
}

export interface ManifestPackage {
  name: string;
  version: string;
  debBytes: number;
  /** `programs`: the package's files (no docs); `libraries`: only the shared objects the programs need */
  role: 'kernel' | 'programs' | 'libraries';
  files: number;
}

export interface GuestImageManifest {
  format: number;
  builder: number;
  /** sha256 of what the image is made of (package versions, scripts, builder version) */
  key: string;
  builtAt: string;
  buildMs: number;
  kernel: {
    package: string;
    version: string;
    release: string;
    compression: string;
    file: 'vmlinux';
    bytes: number;
    sha256: string;
  };
  initrd: { file: 'initrd.img'; format: 'cpio-newc'; bytes: number; sha256: string; entries: number };
  /** what to pass as the kernel command line (`tidemark.workload=` chooses the workload) */
  cmdline: string;
  workloads: string[];
  programs: Record<keyof ScriptPaths, string>;
  modules: { name: string; path: string; depends: string[] }[];
  packages: ManifestPackage[];
  cache: { dir: string; downloaded: number; extracted: number };
}

export interface BuildResult {
  dir: string;
  vmlinux: string;
  initrd: string;
  manifest: GuestImageManifest;
  /** true when nothing was rewritten (the output already matched) */
  upToDate: boolean;
}

/** `$TIDEMARK_CACHE/guest-image`, else `$XDG_CACHE_HOME/tidemark/guest-image`, else `~/.cache/tidemark/guest-image`. */
export function defaultCacheDir(): string {
  if (process.env.TIDEMARK_CACHE) return path.join(path.resolve(process.env.TIDEMARK_CACHE), 'guest-image');
  const xdg = process.env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache');
  return path.join(xdg, 'tidemark', 'guest-image');
}

/** Where `guest-image build` puts the image when no folder is given: `CACHE/image`. */
export function defaultImageDir(): string {
  return path.join(defaultCacheDir(), 'image');
}

/** A package fetched and unpacked: its root folder holds the package's files. */
interface Unpacked {
  info: PackageInfo;
  root: string;
  deb: string;
}

export async function buildGuestImage(opts: BuildOptions = {}): Promise<BuildResult> {
  const started = performance.now();
  const log = opts.log ?? (() => undefined);
  const cacheDir = path.resolve(opts.cacheDir ?? defaultCacheDir());
  const outDir = path.resolve(opts.outDir ?? defaultImageDir());
  const debDir = path.join(cacheDir, 'debs');
  const pkgDir = path.join(cacheDir, 'packages');
  await mkdir(outDir, { recursive: true });
  const stats = { downloaded: 0, extracted: 0 };
  const resolver = await Resolver.load(cacheDir);
  const unpacked = new Map<string, Unpacked>();
  const info = async (name: string) => {
    const i = (await resolver.get([name])).get(name);
    if (!i) throw new TidemarkError('NOT_FOUND', `apt does not know the package ${name}; run apt-get update`);
    return i;
  };
  const fetch = async (names: string[]): Promise<Unpacked[]> => {
    const known = await resolver.get(names);
    const list = names.map((n) => known.get(n)).filter((p): p is PackageInfo => p !== undefined);
    stats.downloaded += await ensureDownloaded(
      list.filter((p) => !unpacked.has(p.name)),
      debDir,
    );
    const out: Unpacked[] = [];
    for (const p of list) {
      let u = unpacked.get(p.name);
      if (!u) {
        const deb = path.join(debDir, debFileName(p));
        const root = path.join(pkgDir, `${p.name}_${p.version.replace(/:/g, '%3a')}`);
        if (await ensureExtracted(deb, root)) stats.extracted++;
        unpacked.set(p.name, (u = { info: p, root, deb }));
      }
      out.push(u);
    }
    return out;
  };

  // 1. The kernel package behind the meta package, and the programs.
  const meta = await info(KERNEL_META);
  const kernelName = meta.depends.find((d) => d.startsWith('linux-image-'));
  if (!kernelName) throw new TidemarkError('NOT_FOUND', `${KERNEL_META} ${meta.version} names no linux-image package`);
  log(`resolving ${kernelName}, ${TOOL_PACKAGES.join(', ')}`);
  const [kernel, ...tools] = await fetch([kernelName, ...TOOL_PACKAGES]);

  // 2. The files of the programs' packages, and the libraries they need (found from the binaries).
  const image = new ImageTree();
  for (const t of tools) await image.addPackage(t);
  const libs = await resolveLibraries(image, tools, resolver, fetch, log);
  await resolver.save();

  const programs = {
    mke2fs: image.findProgram(['/sbin/mke2fs', '/usr/sbin/mke2fs'], 'e2fsprogs mke2fs'),
    e2fsck: image.findProgram(['/sbin/e2fsck', '/usr/sbin/e2fsck'], 'e2fsprogs e2fsck'),
    sqlite3: image.findProgram(['/usr/bin/sqlite3', '/bin/sqlite3'], 'sqlite3'),
    qemuGa: image.findProgram(['/usr/sbin/qemu-ga', '/usr/bin/qemu-ga'], 'qemu-ga'),
  };
  image.findProgram(['/bin/busybox'], 'busybox');
  const scripts = imageScripts(programs);

  // 3. The kernel: release, the modules in dependency order, the decompressed vmlinux (cached per version).
  const release = await kernelRelease(kernel.root);
  const modules = await orderModules(kernel.root, release);

  const key = createHash('sha256')
    .update(
      JSON.stringify({
        builder: BUILDER_VERSION,
        packages: [kernel, ...tools, ...libs].map((u) => `${u.info.name}=${u.info.version}`).sort(),
        modules: modules.map((m) => m.path),
        scripts,
      }),
    )
    .digest('hex');
  const vmlinuxOut = path.join(outDir, 'vmlinux');
  const initrdOut = path.join(outDir, 'initrd.img');
  const current = await readManifest(outDir);
  if (
    !opts.force &&
    current?.key === key &&
    (await sizeOr(vmlinuxOut)) === current.kernel.bytes &&
    (await sizeOr(initrdOut)) === current.initrd.bytes
  ) {
    log(`up to date: ${outDir}`);
    return { dir: outDir, vmlinux: vmlinuxOut, initrd: initrdOut, manifest: current, upToDate: true };
  }

  const vmlinuxCache = path.join(cacheDir, 'kernels', `vmlinux-${release}-${kernel.info.version.replace(/:/g, '%3a')}`);
  const vmlinuz = path.join(kernel.root, 'boot', `vmlinuz-${release}`);
  const bz = await readFile(vmlinuz);
  const payload = locatePayload(bz, vmlinuz);
  let vmlinux: Buffer;
  if ((await sizeOr(vmlinuxCache)) > 0) {
    vmlinux = await readFile(vmlinuxCache);
  } else {
    log(`decompressing ${path.basename(vmlinuz)} (${payload.compression})`);
    vmlinux = await extractVmlinux(bz, vmlinuz);
    await mkdir(path.dirname(vmlinuxCache), { recursive: true });
    await writeFileAtomic(vmlinuxCache, vmlinux);
  }
  await writeFileAtomic(vmlinuxOut, vmlinux);

  // 4. The initramfs.
  log(`writing ${initrdOut}`);
  const tmpInitrd = `${initrdOut}.tmp-${process.pid}`;
  const w = await NewcWriter.create(tmpInitrd);
  try {
    for (const d of [
      'dev',
      'proc',
      'sys',
      'run',
      'tmp',
      'mnt',
      'mnt/data',
      'root',
      'var',
      'var/log',
      'etc',
      'etc/tidemark',
      'bin',
      'sbin',
      'usr',
      'usr/bin',
      'usr/sbin',
      'usr/lib',
      'usr/lib/tidemark',
    ])
      await w.dir(d);
    // The kernel opens /dev/console for init before anything is mounted.
    await w.charDevice('dev/console', 5, 1);
    await image.writeTo(w);
    for (const m of modules)
      await writeWithParents(w, m.path.slice(1), await readFile(path.join(kernel.root, m.path)), 0o644);
    await w.file('etc/tidemark/modules', Buffer.from(modules.map((m) => m.path).join('\n') + '\n'));
    for (const [p, text] of Object.entries(scripts)) {
      if (!w.has(p)) await writeWithParents(w, p, Buffer.from(text), 0o755);
    }
    if (!w.has('etc/mtab')) await w.symlink('etc/mtab', '/proc/mounts');
    await w.file('etc/passwd', Buffer.from('root:x:0:0:root:/root:/bin/sh\n'));
    await w.file('etc/group', Buffer.from('root:x:0:\n'));
    await w.file('etc/hostname', Buffer.from('tidemark-guest\n'));
    await w.file(
      'etc/tidemark/image.json',
      Buffer.from(JSON.stringify({ key, kernel: release, workloads: WORKLOADS }) + '\n'),
    );
    await w.close();
  } catch (err) {
    await w.abort();
    await rm(tmpInitrd, { force: true });
    throw err;
  }
  await rename(tmpInitrd, initrdOut);
  const initrdBytes = await readFile(initrdOut);
  const entries = decodeNewc(initrdBytes).length;

  const pkgEntry = async (u: Unpacked, role: ManifestPackage['role']): Promise<ManifestPackage> => ({
    name: u.info.name,
    version: u.info.version,
    debBytes: await fileSize(u.deb),
    role,
    files: role === 'kernel' ? modules.length + 1 : image.countFrom(u.info.name),
  });
  const manifest: GuestImageManifest = {
    format: MANIFEST_FORMAT,
    builder: BUILDER_VERSION,
    key,
    builtAt: new Date().toISOString(),
    buildMs: 0,
    kernel: {
      package: kernel.info.name,
      version: kernel.info.version,
      release,
      compression: payload.compression,
      file: 'vmlinux',
      bytes: vmlinux.length,
      sha256: sha256(vmlinux),
    },
    initrd: {
      file: 'initrd.img',
      format: 'cpio-newc',
      bytes: initrdBytes.length,
      sha256: sha256(initrdBytes),
      entries,
    },
    cmdline: defaultCmdline('sqlite'),
    workloads: [...WORKLOADS],
    programs,
    modules: modules.map((m) => ({ name: m.name, path: m.path, depends: m.depends })),
    packages: [
      await pkgEntry(kernel, 'kernel'),
      ...(await Promise.all(tools.map((t) => pkgEntry(t, 'programs')))),
      ...(await Promise.all(libs.map((l) => pkgEntry(l, 'libraries')))),
    ],
    cache: { dir: cacheDir, ...stats },
  };
  manifest.buildMs = Math.round(performance.now() - started);
  await writeFileAtomic(path.join(outDir, 'manifest.json'), JSON.stringify(manifest, null, 2) + '\n');
  return { dir: outDir, vmlinux: vmlinuxOut, initrd: initrdOut, manifest, upToDate: false };
}

export async function readManifest(dir: string): Promise<GuestImageManifest | null> {
  try {
    const m = JSON.parse(await readFile(path.join(dir, 'manifest.json'), 'utf8')) as GuestImageManifest;
    return m.format === MANIFEST_FORMAT ? m : null;
  } catch {
    return null;
  }
}

/** Paths inside the image → the scripts' text. */
function imageScripts(p: ScriptPaths): Record<string, string> {
  return {
    init: initScript(p),
    'usr/lib/tidemark/workload': workloadScript(p),
    'usr/lib/tidemark/stop-guest': stopGuestScript(),
    'etc/qemu/fsfreeze-hook.d/tidemark-workload': freezeHookScript(),
    'sbin/shutdown': shutdownScript(),
    'sbin/poweroff': actionScript('poweroff'),
    'sbin/reboot': actionScript('reboot'),
    'sbin/halt': actionScript('halt'),
  };
}

// ------------------------------------------------------------------------------------------ apt, remembered

/**
 * apt-cache answers, remembered in the cache as long as apt's package lists are unchanged (one apt-cache
 * call costs seconds on a loaded machine; a warm build makes none).
 */
class Resolver {
  private readonly known = new Map<string, PackageInfo | null>();
  private dirty = false;

  private constructor(
    private readonly file: string,
    private readonly stamp: string,
  ) {}

  static async load(cacheDir: string): Promise<Resolver> {
    const stamp = await aptListsStamp();
    const r = new Resolver(path.join(cacheDir, 'apt-answers.json'), stamp);
    try {
      const saved = JSON.parse(await readFile(r.file, 'utf8')) as {
        stamp: string;
        packages: Record<string, PackageInfo | null>;
      };
      if (stamp !== '' && saved.stamp === stamp) for (const [k, v] of Object.entries(saved.packages)) r.known.set(k, v);
    } catch {
      // no answers kept yet, or unreadable: ask apt
    }
    return r;
  }

  async get(names: string[]): Promise<Map<string, PackageInfo>> {
    const ask = names.filter((n) => !this.known.has(n));
    if (ask.length > 0) {
      const got = await packageInfos(ask);
      for (const n of ask) this.known.set(n, got.get(n) ?? null);
      this.dirty = true;
    }
    const out = new Map<string, PackageInfo>();
    for (const n of names) {
      const p = this.known.get(n);
      if (p) out.set(n, p);
    }
    return out;
  }

  async save(): Promise<void> {
    if (!this.dirty || this.stamp === '') return;
    await mkdir(path.dirname(this.file), { recursive: true });
    await writeFileAtomic(
      this.file,
      JSON.stringify({ stamp: this.stamp, packages: Object.fromEntries(this.known) }) + '\n',
    );
    this.dirty = false;
  }
}

// ------------------------------------------------------------------------------------------ the image's files

interface TreeEntry {
  /** the package it came from */
  pkg: string;
  /** the file on disk, in the package's unpacked root */
  src: string;
  kind: 'file' | 'symlink' | 'dir';
  target?: string;
  mode: number;
}

/** The union of unpacked package files that go into the image, by absolute image path. */
class ImageTree {
  readonly entries = new Map<string, TreeEntry>();
  private roots: Unpacked[] = [];

  /** All of a program package's files but documentation and init-system glue. */
  async addPackage(u: Unpacked): Promise<void> {
    this.roots.push(u);
    await walk(u.root, async (abs, rel, st) => {
      const p = '/' + rel;
      if (rel === '.tidemark-extracted' || SKIP_PREFIXES.some((s) => p === s || p.startsWith(s + '/'))) return false;
      if (st.isDirectory()) this.put(p, { pkg: u.info.name, src: abs, kind: 'dir', mode: st.mode & 0o7777 });
      else if (st.isSymbolicLink()) {
        this.put(p, { pkg: u.info.name, src: abs, kind: 'symlink', target: await readlink(abs), mode: 0o777 });
      } else if (st.isFile()) this.put(p, { pkg: u.info.name, src: abs, kind: 'file', mode: st.mode & 0o7777 });
      return true;
    });
  }

  /** Adds one path of a library package, following symlinks (within the image) to the real file. */
  async addLibraryPath(u: Unpacked, p: string, depth = 0): Promise<void> {
    if (depth > 16) throw new TidemarkError('INVALID_ARGUMENT', `symlink loop at ${p} in ${u.info.name}`);
    if (this.entries.has(p)) return;
    const abs = path.join(u.root, p);
    const st = await lstat(abs);
    if (st.isSymbolicLink()) {
      const target = await readlink(abs);
      this.put(p, { pkg: u.info.name, src: abs, kind: 'symlink', target, mode: 0o777 });
      const resolved = path.posix.resolve(path.posix.dirname(p), target);
      const owner = await findOwner([u, ...this.roots], resolved);
      if (owner) await this.addLibraryPath(owner, resolved, depth + 1);
    } else if (st.isFile()) {
      this.put(p, { pkg: u.info.name, src: abs, kind: 'file', mode: st.mode & 0o7777 });
    }
  }

  track(u: Unpacked): void {
    if (!this.roots.includes(u)) this.roots.push(u);
  }

  findProgram(candidates: string[], what: string): string {
    const p = candidates.find((c) => this.entries.get(c)?.kind === 'file' || this.entries.get(c)?.kind === 'symlink');
    if (!p) throw new TidemarkError('NOT_FOUND', `the packages hold no ${what} (looked for ${candidates.join(', ')})`);
    return p;
  }

  countFrom(pkg: string): number {
    let n = 0;
    for (const e of this.entries.values()) if (e.pkg === pkg && e.kind !== 'dir') n++;
    return n;
  }

  /** Every ELF regular file in the image (the programs and libraries whose needs must be met). */
  elfFiles(): TreeEntry[] {
    return [...this.entries.values()].filter((e) => e.kind === 'file');
  }

  /** Resolves a path in the image through symlinks; the entry of the final file, or undefined. */
  resolve(p: string, depth = 0): TreeEntry | undefined {
    const e = this.entries.get(p);
    if (!e || depth > 16) return undefined;
    if (e.kind === 'symlink') return this.resolve(path.posix.resolve(path.posix.dirname(p), e.target!), depth + 1);
    return e;
  }

  async writeTo(w: NewcWriter): Promise<void> {
    for (const p of [...this.entries.keys()].sort()) {
      const e = this.entries.get(p)!;
      const rel = p.slice(1);
      if (w.has(rel)) continue;
      await ensureParents(w, rel);
      if (e.kind === 'dir') await w.dir(rel, e.mode || 0o755);
      else if (e.kind === 'symlink') await w.symlink(rel, e.target!);
      else await w.file(rel, await readFile(e.src), e.mode);
    }
  }

  private put(p: string, e: TreeEntry): void {
    if (!this.entries.has(p)) this.entries.set(p, e);
  }
}

/**
 * The closure of shared libraries: every DT_NEEDED soname (and PT_INTERP) of every ELF file in the image
 * must resolve in the library folders; what is missing is looked for in the dependencies of the packages
 * already in, round after round (the package dependencies say where to look, the binaries say what is
 * needed), and only the shared objects needed (with their symlinks) go in.
 */
async function resolveLibraries(
  image: ImageTree,
  tools: Unpacked[],
  resolver: Resolver,
  fetch: (names: string[]) => Promise<Unpacked[]>,
  log: (line: string) => void,
): Promise<Unpacked[]> {
  const considered = new Set<string>(tools.map((t) => t.info.name));
  const candidates: Unpacked[] = [];
  const used = new Map<string, Unpacked>();
  const scanned = new Set<string>();
  const needs = new Map<string, string>(); // soname or path → who needs it
  for (let round = 0; round < MAX_CLOSURE_ROUNDS; round++) {
    // What the image's ELF files need that it does not hold.
    for (const e of image.elfFiles()) {
      if (scanned.has(e.src)) continue;
      scanned.add(e.src);
      const buf = await readFile(e.src);
      if (!isElf(buf)) continue;
      const interp = elfInterpreter(buf, e.src);
      if (interp) needs.set(interp, e.src);
      for (const so of elfNeeded(buf, e.src)) needs.set(so, e.src);
    }
    const missing = [...needs.keys()].filter((n) => !libraryInImage(image, n));
    if (missing.length === 0) return [...used.values()];
    // Look in the packages we have; fetch the next ring of dependencies when they do not have it.
    let progress = false;
    for (const n of missing) {
      for (const c of candidates) {
        const found = await findLibrary(c, n);
        if (found) {
          await image.addLibraryPath(c, found);
          image.track(c);
          used.set(c.info.name, c);
          progress = true;
          break;
        }
      }
    }
    if (progress) continue;
    const next = new Set<string>();
    for (const u of [...tools, ...candidates]) for (const d of u.info.depends) if (!considered.has(d)) next.add(d);
    if (next.size === 0) {
      const who = missing.map((m) => `${m} (needed by ${path.basename(needs.get(m)!)})`).join(', ');
      throw new TidemarkError('NOT_FOUND', `no package among the dependencies provides ${who}`);
    }
    for (const d of next) considered.add(d);
    // Virtual or unavailable names are absent from apt's answer: nothing to fetch for them.
    const names = [...(await resolver.get([...next])).keys()];
    log(`libraries missing (${missing.join(', ')}): looking in ${names.join(', ')}`);
    candidates.push(...(await fetch(names)));
  }
  throw new TidemarkError('LIMIT_EXCEEDED', `the library closure did not settle in ${MAX_CLOSURE_ROUNDS} rounds`);
}

function libraryInImage(image: ImageTree, n: string): boolean {
  if (n.startsWith('/')) return image.resolve(n) !== undefined;
  return LIB_DIRS.some((d) => image.resolve(`${d}/${n}`) !== undefined);
}

async function findLibrary(u: Unpacked, n: string): Promise<string | undefined> {
  const tries = n.startsWith('/') ? [n] : LIB_DIRS.map((d) => `${d}/${n}`);
  for (const t of tries) {
    if (
      await lstat(path.join(u.root, t)).then(
        () => true,
        () => false,
      )
    )
      return t;
  }
  return undefined;
}

async function findOwner(roots: Unpacked[], p: string): Promise<Unpacked | undefined> {
  for (const r of roots)
    if (
      await lstat(path.join(r.root, p)).then(
        () => true,
        () => false,
      )
    )
      return r;
  return undefined;
}

// ------------------------------------------------------------------------------------------ kernel modules

async function kernelRelease(root: string): Promise<string> {
  const rels = (await readdir(path.join(root, 'lib', 'modules')).catch(() => [] as string[])).filter(
    (r) => !r.startsWith('.'),
  );
  if (rels.length !== 1) {
    throw new TidemarkError('INVALID_ARGUMENT', `the kernel package holds ${rels.length} module trees (expected one)`);
  }
  return rels[0];
}

export interface OrderedModule {
  name: string;
  /** image path, `/lib/modules/REL/kernel/...ko` */
  path: string;
  depends: string[];
}

/** The wanted modules and their dependencies, each after what it depends on. */
async function orderModules(root: string, release: string): Promise<OrderedModule[]> {
  const base = `/lib/modules/${release}`;
  const index = new Map<string, string>(); // module name → image path
  await walk(path.join(root, base), async (_abs, rel, st) => {
    if (st.isFile() && rel.endsWith('.ko')) index.set(path.basename(rel, '.ko').replace(/-/g, '_'), `${base}/${rel}`);
    return true;
  });
  const order: OrderedModule[] = [];
  const state = new Map<string, 'visiting' | 'done'>();
  const visit = async (name: string, optional: boolean, chain: string[]): Promise<void> => {
    if (state.get(name) === 'done') return;
    if (state.get(name) === 'visiting') {
      throw new TidemarkError(
        'INVALID_ARGUMENT',
        `kernel modules depend on each other in a cycle: ${[...chain, name].join(' -> ')}`,
      );
    }
    const p = index.get(name);
    if (!p) {
      if (optional) return;
      throw new TidemarkError(
        'NOT_FOUND',
        `the kernel ${release} has no module ${name} (needed by ${chain.at(-1) ?? 'the guest'})`,
      );
    }
    state.set(name, 'visiting');
    const info = moduleInfo(await readFile(path.join(root, p)), p);
    const depends = (info.get('depends')?.[0] ?? '')
      .split(',')
      .filter(Boolean)
      .map((d) => d.replace(/-/g, '_'));
    for (const d of depends) await visit(d, false, [...chain, name]);
    state.set(name, 'done');
    order.push({ name, path: p, depends });
  };
  for (const m of WANTED_MODULES) await visit(m, false, []);
  for (const m of OPTIONAL_MODULES) await visit(m, true, []);
  return order;
}

// ------------------------------------------------------------------------------------------ helpers

/** Depth-first walk (lstat, no symlink following); `fn` returns false to skip a folder's content. */
async function walk(
  dir: string,
  fn: (abs: string, rel: string, st: import('node:fs').Stats) => Promise<boolean>,
  rel = '',
): Promise<void> {
  const names = (await readdir(dir)).sort();
  for (const n of names) {
    const abs = path.join(dir, n);
    const r = rel ? `${rel}/${n}` : n;
    const st = await lstat(abs);
    const go = await fn(abs, r, st);
    if (go && st.isDirectory()) await walk(abs, fn, r);
  }
}

async function ensureParents(w: NewcWriter, rel: string): Promise<void> {
  const parts = rel.split('/').slice(0, -1);
  for (let i = 1; i <= parts.length; i++) {
    const d = parts.slice(0, i).join('/');
    if (!w.has(d)) await w.dir(d);
  }
}

async function writeWithParents(w: NewcWriter, rel: string, data: Buffer, mode: number): Promise<void> {
  await ensureParents(w, rel);
  await w.file(rel, data, mode);
}

async function sizeOr(p: string): Promise<number> {
  return stat(p).then(
    (s) => s.size,
    () => -1,
  );
}

function sha256(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}
