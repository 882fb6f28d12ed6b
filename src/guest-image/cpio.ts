/**
 * The initramfs archive format the Linux kernel unpacks: cpio "newc" (SVR4 without CRC). Each entry is a
 * 110-byte ASCII header (`070701` and thirteen 8-digit hex fields), the NUL-terminated name padded to 4
 * bytes, then the data padded to 4 bytes; the archive ends with the entry `TRAILER!!!`. Encoder (streaming
 * to a file, nothing held beyond one file) and decoder (bounds-checked) side by side.
 */
import { open, type FileHandle } from 'node:fs/promises';
import { TidemarkError } from '../errors.js';

export const NEWC_MAGIC = '070701';
const HEADER_BYTES = 110;
const TRAILER = 'TRAILER!!!';

export const S_IFMT = 0o170000;
export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;
export const S_IFLNK = 0o120000;
export const S_IFCHR = 0o020000;

export interface CpioHeader {
  ino: number;
  mode: number;
  uid: number;
  gid: number;
  nlink: number;
  mtime: number;
  fileSize: number;
  devMajor: number;
  devMinor: number;
  rdevMajor: number;
  rdevMinor: number;
  name: string;
}

/** The header bytes of one entry, name and padding included (the data follows, padded to 4). */
export function encodeNewcHeader(h: CpioHeader): Buffer {
  const name = Buffer.from(h.name + '\0', 'utf8');
  const fields = [
    h.ino,
    h.mode,
    h.uid,
    h.gid,
    h.nlink,
    h.mtime,
    h.fileSize,
    h.devMajor,
    h.devMinor,
    h.rdevMajor,
    h.rdevMinor,
    name.length,
    0, // check: always 0 in newc
  ];
  let text = NEWC_MAGIC;
  for (const f of fields) {
    if (!Number.isSafeInteger(f) || f < 0 || f > 0xffffffff) {
      throw new TidemarkError('INVALID_ARGUMENT', `cpio entry ${h.name}: field value ${f} does not fit in 32 bits`);
    }
    text += f.toString(16).padStart(8, '0');
  }
  const head = Buffer.concat([Buffer.from(text, 'ascii'), name]);
  return Buffer.concat([head, Buffer.alloc(pad4(head.length))]);
}

export interface CpioEntry {
  name: string;
  mode: number;
  fileSize: number;
  rdevMajor: number;
  rdevMinor: number;
  /** where the data starts in the archive buffer */
  dataOffset: number;
}

/** Lists a newc archive's entries up to its trailer; every length is checked against the buffer first. */
export function decodeNewc(buf: Buffer): CpioEntry[] {
  const out: CpioEntry[] = [];
  let o = 0;
  for (;;) {
    if (o + HEADER_BYTES > buf.length) throw corrupt(o, 'truncated header (no TRAILER!!! entry)');
    const magic = buf.toString('ascii', o, o + 6);
    if (magic !== NEWC_MAGIC) throw corrupt(o, `bad magic "${magic}" (not cpio newc)`);
    const field = (i: number) => {
      const s = buf.toString('ascii', o + 6 + i * 8, o + 14 + i * 8);
      if (!/^[0-9a-fA-F]{8}$/.test(s)) throw corrupt(o, `header field ${i} is not hex: "${s}"`);
      return parseInt(s, 16);
    };
    const mode = field(1);
    const fileSize = field(6);
    const nameSize = field(11);
    if (nameSize < 1) throw corrupt(o, 'empty name');
    const nameEnd = o + HEADER_BYTES + nameSize;
    if (nameEnd > buf.length) throw corrupt(o, 'name runs past the end');
    if (buf[nameEnd - 1] !== 0) throw corrupt(o, 'name is not NUL-terminated');
    const name = buf.toString('utf8', o + HEADER_BYTES, nameEnd - 1);
    const dataOffset = nameEnd + pad4(HEADER_BYTES + nameSize);
    if (dataOffset + fileSize > buf.length) throw corrupt(o, `data of ${name} runs past the end`);
    if (name === TRAILER) return out;
    out.push({ name, mode, fileSize, rdevMajor: field(9), rdevMinor: field(10), dataOffset });
    o = dataOffset + fileSize + pad4(fileSize);
  }
}

/** Writes a newc archive entry by entry; `close()` adds the trailer. Inode numbers are assigned in order. */
export class NewcWriter {
  private ino = 0;
  private written = 0;
  private readonly names = new Set<string>();

  private constructor(private readonly fh: FileHandle) {}

  static async create(file: string): Promise<NewcWriter> {
    return new NewcWriter(await open(file, 'w', 0o644));
  }

  get bytes(): number {
    return this.written;
  }

  has(name: string): boolean {
    return this.names.has(name);
  }

  async dir(name: string, perm = 0o755): Promise<void> {
    await this.entry(name, S_IFDIR | perm, Buffer.alloc(0), { nlink: 2 });
  }

  async file(name: string, data: Buffer, perm = 0o644): Promise<void> {
    await this.entry(name, S_IFREG | perm, data);
  }

  async symlink(name: string, target: string): Promise<void> {
    await this.entry(name, S_IFLNK | 0o777, Buffer.from(target, 'utf8'));
  }

  async charDevice(name: string, major: number, minor: number, perm = 0o600): Promise<void> {
    await this.entry(name, S_IFCHR | perm, Buffer.alloc(0), { rdevMajor: major, rdevMinor: minor });
  }

  async close(): Promise<void> {
    try {
      await this.entry(TRAILER, 0, Buffer.alloc(0), { trailer: true });
      await this.fh.sync();
    } finally {
      await this.fh.close();
    }
  }

  async abort(): Promise<void> {
    await this.fh.close().catch(() => undefined);
  }

  private async entry(
    name: string,
    mode: number,
    data: Buffer,
    extra: { nlink?: number; rdevMajor?: number; rdevMinor?: number; trailer?: boolean } = {},
  ): Promise<void> {
    if (!extra.trailer) {
      if (name === '' || name.startsWith('/') || name.split('/').includes('..')) {
        throw new TidemarkError('INVALID_ARGUMENT', `cpio entry name "${name}" must be relative, without ".."`);
      }
      if (this.names.has(name)) throw new TidemarkError('ALREADY_EXISTS', `cpio entry ${name} was already written`);
      this.names.add(name);
    }
    const header = encodeNewcHeader({
      ino: extra.trailer ? 0 : ++this.ino,
      mode,
      uid: 0,
      gid: 0,
      nlink: extra.nlink ?? 1,
      mtime: 0, // reproducible archives: the same inputs give the same bytes
      fileSize: data.length,
      devMajor: 0,
      devMinor: 0,
      rdevMajor: extra.rdevMajor ?? 0,
      rdevMinor: extra.rdevMinor ?? 0,
      name,
    });
    const parts = [header, data, Buffer.alloc(pad4(data.length))];
    for (const p of parts) {
      if (p.length > 0) await this.fh.write(p);
      this.written += p.length;
    }
  }
}

function pad4(n: number): number {
  return (4 - (n % 4)) % 4;
}

function corrupt(offset: number, problem: string): TidemarkError {
  return new TidemarkError('INVALID_ARGUMENT', `cpio archive at offset ${offset}: ${problem}`, { offset });
}
