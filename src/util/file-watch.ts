/**
 * Who else opens or writes a file while we hold it. Image locks keep out programs that respect them; this
 * finds the ones that do not (dd, qemu-io with locking=off, a copy tool writing in place), so the change
 * tracker can refuse to vouch for a disk another process wrote.
 *
 * One fanotify group per process (native addon, native/fs/watch.c) with a mark per watched file: an open
 * or a close-after-write by any other process is queued with its pid. The queue is drained every few
 * seconds (so it never overflows) and whenever a watcher asks. An open by another process counts only if
 * that process holds the file open for writing (read from /proc), so readers (`qemu-img info -U`) are
 * harmless. Writers that opened the file before the mark was placed are found by a /proc scan at start.
 * Without fanotify (no addon, or refused) a watch says so: `available` is false and `why` tells.
 */
import { readdirSync, readFileSync, readlinkSync, statSync } from 'node:fs';
import path from 'node:path';
import { nativeFs, type NativeFs } from './native.js';

/** Something another process did to a watched file. */
export interface ForeignAccess {
  file: string;
  /** The other process, when it could be identified. */
  pid: number | null;
  program: string | null;
  what: 'wrote' | 'holds it open for writing' | 'replaced or removed it' | 'events were lost';
}

const FAN_OPEN = 0x20;
const FAN_CLOSE_WRITE = 0x08;
const FAN_Q_OVERFLOW = 0x4000;
const DRAIN_EVERY_MS = 5000;

interface Mark {
  path: string;
  key: string;
  /** `dev:ino` when marked: the path must keep naming this file. */
  identity: string;
  watchers: Set<FileWatch>;
  /** Other processes seen holding the file open for writing since it was marked (checked again on a join). */
  holders: Set<number>;
}

/** The process's fanotify group, its marks and the findings not yet taken by their watchers. */
class Group {
  private marks = new Map<string, Mark>(); // by key
  private byPath = new Map<string, Mark>();
  private timer: NodeJS.Timeout | undefined;

  private constructor(
    private readonly native: NativeFs,
    private readonly fd: number,
    private readonly mode: 'fid' | 'fd',
  ) {}

  private static instance: Group | null | undefined;
  static why = '';

  static get(): Group | null {
    if (Group.instance === undefined) {
      try {
        const native = nativeFs();
        const { fd, mode } = native.watchInit();
        Group.instance = new Group(native, fd, mode);
      } catch (err) {
        Group.instance = null;
        Group.why = `fanotify is not available here (${(err as Error).message})`;
      }
    }
    return Group.instance;
  }

  /**
   * Marks the file for `watcher`. Returns true when the mark is new: the caller must then look through /proc
   * for writers that opened the file before it. Joining another watcher's mark needs no look: the mark saw every
   * open since its own look. The watcher is told of each writer it ever saw that still holds the file.
   */
  add(file: string, watcher: FileWatch): boolean {
    let mark = this.byPath.get(file);
    if (mark && this.identityNow(file) !== mark.identity) {
      // The path names another file now: the old mark is of no use for it.
      this.drop(mark);
      mark = undefined;
    }
    let fresh = false;
    if (!mark) {
      const key = this.native.watchAdd(this.fd, this.mode, file);
      const st = statSync(file, { bigint: true });
      mark = {
        path: file,
        key,
        identity: `${st.dev}:${st.ino}`,
        watchers: new Set(),
        holders: new Set(),
      };
      this.marks.set(key, mark);
      this.byPath.set(file, mark);
      fresh = true;
    } else {
      this.drain(); // what happened up to now reaches the mark's earlier watchers
      for (const pid of [...mark.holders]) {
        if (writableOpeners(mark.identity, [pid]).length > 0)
          watcher.note({ file, pid, program: programOf(pid), what: 'holds it open for writing' });
        else mark.holders.delete(pid);
      }
    }
    mark.watchers.add(watcher);
    if (!this.timer) {
      this.timer = setInterval(() => this.drain(), DRAIN_EVERY_MS);
      this.timer.unref();
    }
    return fresh;
  }

  /** A writer found holding a marked file (by a /proc look): remembered for the mark's later watchers. */
  noteHolder(file: string, pid: number): void {
    this.byPath.get(file)?.holders.add(pid);
  }

  remove(file: string, watcher: FileWatch): void {
    const mark = this.byPath.get(file);
    if (!mark || !mark.watchers.delete(watcher) || mark.watchers.size > 0) return;
    this.drain(); // what happened before the last watcher left still reaches its findings
    this.drop(mark);
  }

  private drop(mark: Mark): void {
    if (this.marks.get(mark.key) === mark) this.marks.delete(mark.key);
    if (this.byPath.get(mark.path) === mark) this.byPath.delete(mark.path);
    try {
      this.native.watchRemove(this.fd, this.mode, mark.path);
    } catch {
      // The file is gone: so is its mark.
    }
    if (this.byPath.size === 0 && this.timer) {
      clearInterval(this.timer);
      this.timer = undefined;
    }
  }

  private identityNow(file: string): string | undefined {
    try {
      const st = statSync(file, { bigint: true });
      return `${st.dev}:${st.ino}`;
    } catch {
      return undefined;
    }
  }

  /** A finding for the mark's watchers. */
  private tell(mark: Mark, f: ForeignAccess): void {
    if (f.what === 'holds it open for writing' && f.pid) mark.holders.add(f.pid);
    for (const w of mark.watchers) w.note(f);
  }

  identityOf(file: string): string | undefined {
    return this.byPath.get(file)?.identity;
  }

  /** Takes the queued events and hands each watcher what other processes did to its files. */
  drain(): void {
    let events: (number | string)[];
    try {
      events = this.native.watchDrain(this.fd, this.mode);
    } catch {
      events = [FAN_Q_OVERFLOW, 0, ''];
    }
    for (let i = 0; i < events.length; i += 3) {
      const mask = events[i] as number;
      const pid = events[i + 1] as number;
      const key = events[i + 2] as string;
      if (mask & FAN_Q_OVERFLOW) {
        for (const m of this.marks.values())
          this.tell(m, { file: m.path, pid: null, program: null, what: 'events were lost' });
        continue;
      }
      if (pid === process.pid) continue;
      const mark = this.marks.get(key);
      if (!mark) continue;
      let finding: ForeignAccess | undefined;
      if (mask & FAN_CLOSE_WRITE) {
        finding = { file: mark.path, pid: pid || null, program: pid ? programOf(pid) : null, what: 'wrote' };
      } else if (mask & FAN_OPEN) {
        // An open: harmful only if that process can write the file (a reader is welcome).
        const writer = writableOpeners(mark.identity, pid ? [pid] : undefined).find((p) => p !== process.pid);
        if (writer !== undefined)
          finding = { file: mark.path, pid: writer, program: programOf(writer), what: 'holds it open for writing' };
      }
      if (finding) this.tell(mark, finding);
    }
  }
}

/** Watches a set of files for other processes' writes; `findings()` reports them once each. */
export class FileWatch {
  private readonly files = new Set<string>();
  private readonly found: ForeignAccess[] = [];
  /** Other processes seen holding a watched file open for writing: reported again while they still do. */
  private readonly holders = new Map<number, string>();
  private closed = false;

  private constructor(
    private readonly group: Group | null,
    private readonly off: string,
  ) {}

  /** Starts watching `files` (absolute paths); writers that already hold one open are findings at once. */
  static start(files: string[]): FileWatch {
    // TIDEMARK_NO_FANOTIFY=1 turns watching off (then foreign writers are caught at the next open and
    // by header checks only): for file systems or sandboxes where fanotify misbehaves, and for tests.
    const off = process.env.TIDEMARK_NO_FANOTIFY === '1';
    const w = new FileWatch(off ? null : Group.get(), off ? 'turned off (TIDEMARK_NO_FANOTIFY=1)' : '');
    const marked = files.filter((f) => w.add(f, { fresh: true }));
    if (w.group && marked.length > 0) {
      // Writers that opened a newly marked file before its mark: one look through /proc for all of them (a mark
      // another watch holds already saw every open since its own look).
      const ids = new Map(marked.map((f) => [w.group!.identityOf(f)!, f]));
      const found = writableOpenersOf(new Set(ids.keys()));
      for (const [id, file] of ids) {
        for (const pid of found.get(id) ?? [])
          if (pid !== process.pid) {
            w.group.noteHolder(file, pid);
            w.note({ file, pid, program: programOf(pid), what: 'holds it open for writing' });
          }
      }
    }
    return w;
  }

  /** Whether other processes' writes are seen while the files are open; `why` says why not. */
  get available(): boolean {
    return this.group !== null;
  }

  get why(): string {
    return this.group ? '' : this.off || Group.why;
  }

  /**
   * Watches one more file. `fresh`: skip the look through /proc for writers that opened it before the mark
   * (`start` does one for all its files; a file this process just created has none). Returns true when the
   * look was skipped for a new mark (a mark that existed already needs none).
   */
  add(file: string, opts: { fresh?: boolean } = {}): boolean {
    if (this.closed || this.files.has(file)) return false;
    this.files.add(file);
    if (!this.group) return false;
    const marked = this.group.add(file, this);
    if (opts.fresh || !marked) return marked;
    for (const pid of writableOpeners(this.group.identityOf(file)!)) {
      if (pid !== process.pid) {
        this.group.noteHolder(file, pid);
        this.note({ file, pid, program: programOf(pid), what: 'holds it open for writing' });
      }
    }
    return false;
  }

  remove(file: string): void {
    if (!this.files.delete(file)) return;
    this.group?.remove(file, this);
  }

  /** @internal called by the group. */
  note(f: ForeignAccess): void {
    if (this.closed) return;
    this.found.push(f);
    if (f.what === 'holds it open for writing' && f.pid) this.holders.set(f.pid, f.file);
  }

  /**
   * What other processes did to the watched files since the last call, and files whose path now names
   * another file (replaced, renamed away or deleted) while we hold them.
   */
  findings(): ForeignAccess[] {
    if (!this.group) return [];
    this.group.drain();
    // A writer that keeps the file open may write again at any time: as long as it does, nothing is vouched.
    for (const [pid, file] of this.holders) {
      const id = this.group.identityOf(file);
      if (id && writableOpeners(id, [pid]).length > 0) {
        if (!this.found.some((f) => f.pid === pid && f.file === file))
          this.found.push({ file, pid, program: programOf(pid), what: 'holds it open for writing' });
      } else this.holders.delete(pid);
    }
    for (const f of this.files) {
      let now: string | undefined;
      try {
        const st = statSync(f, { bigint: true });
        now = `${st.dev}:${st.ino}`;
      } catch {
        now = undefined;
      }
      if (now !== this.group.identityOf(f))
        this.found.push({ file: f, pid: null, program: null, what: 'replaced or removed it' });
    }
    return this.found.splice(0);
  }

  close(): void {
    if (this.closed) return;
    for (const f of [...this.files]) this.remove(f);
    this.closed = true;
  }
}

/** One line for a finding: "dd (pid 4242) wrote scsi0-0.vhdx". */
export function describeAccess(f: ForeignAccess): string {
  const who = !f.pid
    ? 'another process'
    : f.program
      ? `${f.program} (pid ${f.pid})`
      : `process ${f.pid} (gone before it could be named)`;
  const name = path.basename(f.file);
  if (f.what === 'events were lost') return `events about ${name} were lost (fanotify queue overflow)`;
  if (f.what === 'replaced or removed it') return `${name} was replaced, renamed or removed while open`;
  return `${who} ${f.what === 'wrote' ? 'wrote' : 'holds open for writing'} ${name}`;
}

/** Pids (among `pids`, or every readable process) holding the file `identity` (`dev:ino`) open for writing. */
export function writableOpeners(identity: string, pids?: number[]): number[] {
  return writableOpenersOf(new Set([identity]), pids).get(identity) ?? [];
}

/** For each of `identities` (`dev:ino`), the pids (among `pids`, or all readable) holding it open for writing. */
function writableOpenersOf(identities: Set<string>, pids?: number[]): Map<string, number[]> {
  const out = new Map<string, number[]>();
  let candidates = pids;
  if (!candidates) {
    try {
      candidates = readdirSync('/proc')
        .filter((d) => /^\d+$/.test(d))
        .map(Number);
    } catch {
      return out;
    }
  }
  for (const pid of candidates) {
    // Never this process: its own descriptors are not foreign (every caller drops them), and a host serving
    // hundreds of disks holds thousands of them, which made every scan cost as much as all the others together.
    if (pid === process.pid) continue;
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue; // gone, or not ours to look at
    }
    for (const fd of fds) {
      try {
        // Cheap first: only descriptors naming a file (not sockets, pipes, anon inodes) are stat'ed.
        if (!readlinkSync(`/proc/${pid}/fd/${fd}`).startsWith('/')) continue;
        const st = statSync(`/proc/${pid}/fd/${fd}`, { bigint: true });
        const id = `${st.dev}:${st.ino}`;
        if (!identities.has(id)) continue;
        const flags = /flags:\s*([0-7]+)/.exec(readFileSync(`/proc/${pid}/fdinfo/${fd}`, 'utf8'));
        if (flags && (parseInt(flags[1], 8) & 3) !== 0) {
          const list = out.get(id) ?? [];
          if (!list.includes(pid)) list.push(pid);
          out.set(id, list);
        }
      } catch {
        // The descriptor closed meanwhile.
      }
    }
  }
  return out;
}

function programOf(pid: number): string | null {
  try {
    return readFileSync(`/proc/${pid}/comm`, 'utf8').trim() || null;
  } catch {
    return null;
  }
}
