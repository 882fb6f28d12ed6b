/**
 * Who holds a lock on a file, for the one-line error of a refused open: "qemu-io (pid 4242)", or
 * "tidemark host (pid 77, store /srv/tidemark): stop the VM or use the host's API". Only read on a
 * conflict, never on the I/O path.
 *
 * /proc/locks lists every lock by dev:inode and byte range, but an OFD lock (QEMU's kind, and ours) shows
 * pid -1 there: its owner is an open file description. /proc/PID/fdinfo/FD lists the locks of each
 * descriptor, so the holder of an OFD lock is found by looking through the processes' descriptors.
 */
import { readdir, readFile, readlink } from 'node:fs/promises';
import path from 'node:path';
import { readSmallFile } from './safe-open.js';

/** A lock as /proc/locks and fdinfo print it: `1: OFDLCK ADVISORY  READ -1 fe:00:2146305 100 101`. */
const LOCK_LINE =
  /^(?:lock:\s*)?\d+:\s+(?:->\s+)?\S+\s+\S+\s+\S+\s+(-?\d+)\s+([0-9a-f]+):([0-9a-f]+):(\d+)\s+(\d+)\s+(\d+|EOF)/;

interface ParsedLock {
  pid: number;
  major: bigint;
  minor: bigint;
  ino: bigint;
  start: number;
  end: number;
}

function parseLock(line: string): ParsedLock | undefined {
  const m = LOCK_LINE.exec(line.trim());
  if (!m) return undefined;
  return {
    pid: Number(m[1]),
    major: BigInt(`0x${m[2]}`),
    minor: BigInt(`0x${m[3]}`),
    ino: BigInt(m[4]),
    start: Number(m[5]),
    end: m[6] === 'EOF' ? Infinity : Number(m[6]),
  };
}

/** glibc's major()/minor() of a st_dev (the kernel prints the device as hex major:minor). */
function devParts(dev: bigint): { major: bigint; minor: bigint } {
  return {
    major: ((dev >> 8n) & 0xfffn) | ((dev >> 32n) & ~0xfffn),
    minor: (dev & 0xffn) | ((dev >> 12n) & ~0xffn),
  };
}

/** Locks on (dev, ino) covering `byte`, those on the same device first (some file systems show another one). */
function matching(text: string, file: { dev: bigint; ino: bigint }, byte: number): ParsedLock[] {
  const { major, minor } = devParts(file.dev);
  const out: ParsedLock[] = [];
  const ino = `:${file.ino} `;
  for (const line of text.split('\n')) {
    if (!line.includes(ino)) continue;
    const l = parseLock(line);
    if (l && l.ino === file.ino && l.start <= byte && byte <= l.end) out.push(l);
  }
  return out.sort(
    (a, b) => Number(b.major === major && b.minor === minor) - Number(a.major === major && a.minor === minor),
  );
}

/**
 * The pid of a process holding a lock on `byte` of the file (dev, ino), other than this one: `pidHint`
 * when F_OFD_GETLK named one (a POSIX lock), else from /proc/locks, else from the descriptors' fdinfo.
 */
export async function findLockHolder(
  file: { dev: bigint; ino: bigint },
  byte: number,
  pidHint?: number,
): Promise<number | undefined> {
  if (pidHint !== undefined && pidHint > 0 && pidHint !== process.pid) return pidHint;
  const all = await readFile('/proc/locks', 'utf8').catch(() => '');
  const posix = matching(all, file, byte).find((l) => l.pid > 0 && l.pid !== process.pid);
  if (posix) return posix.pid;
  let pids: string[];
  try {
    pids = (await readdir('/proc')).filter((n) => /^\d+$/.test(n) && Number(n) !== process.pid);
  } catch {
    return undefined;
  }
  for (const pid of pids) {
    const dir = `/proc/${pid}/fdinfo`;
    const fds = await readdir(dir).catch(() => [] as string[]);
    const infos = await Promise.all(fds.map((fd) => readFile(`${dir}/${fd}`, 'utf8').catch(() => '')));
    if (infos.some((info) => info.includes('lock:') && matching(info, file, byte).length > 0)) return Number(pid);
  }
  return undefined;
}

/** The command line of `pid` (argv), or [] when it cannot be read. */
async function commandLine(pid: number): Promise<string[]> {
  const raw = await readFile(`/proc/${pid}/cmdline`).catch(() => Buffer.alloc(0));
  const argv = raw
    .subarray(0, 64 * 1024)
    .toString('utf8')
    .split('\0');
  while (argv.length > 0 && argv[argv.length - 1] === '') argv.pop();
  return argv;
}

/** `tidemark` and its subcommand words when argv runs the Tidemark CLI ("host", "vhdx write"), else undefined. */
function tidemarkCommand(argv: string[]): { words: string[]; args: string[] } | undefined {
  const isCli = (a: string | undefined) =>
    a !== undefined &&
    (['tidemark', 'tidemark.js'].includes(path.basename(a)) || a.endsWith(`${path.sep}cli${path.sep}main.js`));
  const at = isCli(argv[0]) ? 0 : isCli(argv[1]) ? 1 : -1;
  if (at < 0) return undefined;
  const args = argv.slice(at + 1);
  const words: string[] = [];
  for (const a of args) {
    if (words.length === 2 || !/^[a-z][a-z-]*$/.test(a)) break;
    words.push(a);
  }
  return { words, args };
}

/** The store of the host `pid` serves: a host.json naming it in a directory above `file`, or its --store. */
async function hostStore(pid: number, file: string, argv: string[]): Promise<string | undefined> {
  for (let dir = path.dirname(path.resolve(file)); ; dir = path.dirname(dir)) {
    try {
      const info = JSON.parse((await readSmallFile(path.join(dir, 'host.json'), { maxBytes: 64 * 1024 })).toString());
      if (info?.pid === pid) return dir;
    } catch {
      // not a store, or not this host's
    }
    if (dir === path.dirname(dir)) break;
  }
  const cli = tidemarkCommand(argv);
  if (cli?.words[0] !== 'host') return undefined;
  const i = cli.args.findIndex((a) => a === '--store' || a.startsWith('--store='));
  if (i < 0) return undefined;
  const store = cli.args[i].startsWith('--store=') ? cli.args[i].slice(8) : cli.args[i + 1];
  if (!store) return undefined;
  const cwd = await readlink(`/proc/${pid}/cwd`).catch(() => '/');
  return path.resolve(cwd, store);
}

/**
 * Who `pid` is, for an error about `file`: "qemu-nbd (pid 4242)", "tidemark vhdx write (pid 9)", or for a
 * Tidemark host "tidemark host (pid 77, store /srv/tidemark): stop the VM or use the host's API".
 */
export async function describeLockHolder(pid: number, file: string): Promise<string> {
  const argv = await commandLine(pid);
  const store = await hostStore(pid, file, argv);
  if (store !== undefined) return `tidemark host (pid ${pid}, store ${store}): stop the VM or use the host's API`;
  const cli = tidemarkCommand(argv);
  if (cli) return `${['tidemark', ...cli.words].join(' ')} (pid ${pid})`;
  const program = argv[0]
    ? path.basename(argv[0])
    : (await readFile(`/proc/${pid}/comm`, 'utf8').catch(() => 'a process')).trim();
  return `${program} (pid ${pid})`;
}
