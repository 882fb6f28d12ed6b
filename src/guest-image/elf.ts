/**
 * Just enough of ELF64 (little-endian, x86-64) to build a guest image: the shared libraries a binary needs
 * (DT_NEEDED, read through PT_DYNAMIC), its program interpreter (PT_INTERP), and a kernel module's
 * `.modinfo` strings (`depends=`, `name=`). Every offset is bounds-checked before it is read, so a damaged
 * or foreign file gives an ElfError, never a crash.
 */
import { TidemarkErrorBase } from '../errors.js';

export class ElfError extends TidemarkErrorBase<'INVALID_ARGUMENT'> {
  constructor(what: string, problem: string) {
    super('INVALID_ARGUMENT', `${what}: ${problem}`);
    this.name = 'ElfError';
  }
}

export interface ElfSegment {
  type: number;
  offset: number;
  vaddr: number;
  fileSize: number;
}

export interface ElfSection {
  name: string;
  type: number;
  offset: number;
  size: number;
}

export interface ElfInfo {
  /** ET_EXEC 2, ET_DYN 3, ET_REL 1 (kernel modules) */
  type: number;
  segments: ElfSegment[];
  sections: ElfSection[];
}

const PT_LOAD = 1;
const PT_DYNAMIC = 2;
const PT_INTERP = 3;
const DT_NULL = 0;
const DT_NEEDED = 1;
const DT_STRTAB = 5;
/** Bounds on what a sane file has: refuse anything beyond before iterating. */
const MAX_HEADERS = 4096;

export function isElf(buf: Uint8Array): boolean {
  return buf.length >= 4 && buf[0] === 0x7f && buf[1] === 0x45 && buf[2] === 0x4c && buf[3] === 0x46;
}

/** Decodes the ELF header with its program and section headers (section names resolved). */
export function decodeElf(buf: Buffer, what = 'ELF file'): ElfInfo {
  if (!isElf(buf)) throw new ElfError(what, 'not an ELF file (no \\x7fELF magic)');
  if (buf.length < 64) throw new ElfError(what, `truncated ELF header (${buf.length} bytes)`);
  if (buf[4] !== 2) throw new ElfError(what, 'not a 64-bit ELF file');
  if (buf[5] !== 1) throw new ElfError(what, 'not a little-endian ELF file');
  const type = buf.readUInt16LE(16);
  const phoff = num(buf.readBigUInt64LE(32));
  const shoff = num(buf.readBigUInt64LE(40));
  const phentsize = buf.readUInt16LE(54);
  const phnum = buf.readUInt16LE(56);
  const shentsize = buf.readUInt16LE(58);
  const shnum = buf.readUInt16LE(60);
  const shstrndx = buf.readUInt16LE(62);
  if (phnum > MAX_HEADERS || shnum > MAX_HEADERS) throw new ElfError(what, 'implausible header count');
  const segments: ElfSegment[] = [];
  if (phnum > 0) {
    if (phentsize < 56) throw new ElfError(what, `program header entries of ${phentsize} bytes`);
    checkRange(buf, phoff, phentsize * phnum, what, 'program headers');
    for (let i = 0; i < phnum; i++) {
      const o = phoff + i * phentsize;
      segments.push({
        type: buf.readUInt32LE(o),
        offset: num(buf.readBigUInt64LE(o + 8)),
        vaddr: num(buf.readBigUInt64LE(o + 16)),
        fileSize: num(buf.readBigUInt64LE(o + 32)),
      });
    }
  }
  const raw: { nameOff: number; type: number; offset: number; size: number }[] = [];
  if (shnum > 0 && shoff > 0) {
    if (shentsize < 64) throw new ElfError(what, `section header entries of ${shentsize} bytes`);
    checkRange(buf, shoff, shentsize * shnum, what, 'section headers');
    for (let i = 0; i < shnum; i++) {
      const o = shoff + i * shentsize;
      raw.push({
        nameOff: buf.readUInt32LE(o),
        type: buf.readUInt32LE(o + 4),
        offset: num(buf.readBigUInt64LE(o + 24)),
        size: num(buf.readBigUInt64LE(o + 32)),
      });
    }
  }
  const names = shstrndx < raw.length ? raw[shstrndx] : undefined;
  if (names) checkRange(buf, names.offset, names.size, what, 'section name table');
  const sections = raw.map((s) => ({
    name: names ? cString(buf, names.offset + s.nameOff, names.offset + names.size) : '',
    type: s.type,
    offset: s.offset,
    size: s.size,
  }));
  return { type, segments, sections };
}

/** The program interpreter (`/lib64/ld-linux-x86-64.so.2`), or null for a static binary. */
export function elfInterpreter(buf: Buffer, what = 'ELF file'): string | null {
  const interp = decodeElf(buf, what).segments.find((s) => s.type === PT_INTERP);
  if (!interp) return null;
  checkRange(buf, interp.offset, interp.fileSize, what, 'PT_INTERP');
  return cString(buf, interp.offset, interp.offset + interp.fileSize);
}

/** The DT_NEEDED sonames, in file order (empty for a static binary). */
export function elfNeeded(buf: Buffer, what = 'ELF file'): string[] {
  const elf = decodeElf(buf, what);
  const dyn = elf.segments.find((s) => s.type === PT_DYNAMIC);
  if (!dyn) return [];
  checkRange(buf, dyn.offset, dyn.fileSize, what, 'PT_DYNAMIC');
  const needed: number[] = [];
  let strtabAddr: number | undefined;
  for (let o = dyn.offset; o + 16 <= dyn.offset + dyn.fileSize; o += 16) {
    const tag = num(buf.readBigUInt64LE(o));
    const val = num(buf.readBigUInt64LE(o + 8));
    if (tag === DT_NULL) break;
    if (tag === DT_NEEDED) needed.push(val);
    else if (tag === DT_STRTAB) strtabAddr = val;
  }
  if (needed.length === 0) return [];
  if (strtabAddr === undefined) throw new ElfError(what, 'DT_NEEDED without DT_STRTAB');
  // DT_STRTAB is a virtual address: map it to the file through the PT_LOAD segment holding it.
  const load = elf.segments.find(
    (s) => s.type === PT_LOAD && strtabAddr! >= s.vaddr && strtabAddr! < s.vaddr + s.fileSize,
  );
  if (!load) throw new ElfError(what, 'DT_STRTAB lies in no loaded segment');
  const strtab = load.offset + (strtabAddr - load.vaddr);
  const end = load.offset + load.fileSize;
  checkRange(buf, load.offset, load.fileSize, what, 'the segment holding DT_STRTAB');
  return needed.map((off) => {
    if (strtab + off >= end) throw new ElfError(what, 'a DT_NEEDED name lies outside its string table');
    return cString(buf, strtab + off, end);
  });
}

/** A kernel module's `.modinfo` as key → values (`depends` may be empty: "depends="). */
export function moduleInfo(buf: Buffer, what = 'kernel module'): Map<string, string[]> {
  const elf = decodeElf(buf, what);
  const sec = elf.sections.find((s) => s.name === '.modinfo');
  if (!sec) throw new ElfError(what, 'no .modinfo section: not a kernel module');
  checkRange(buf, sec.offset, sec.size, what, '.modinfo');
  const out = new Map<string, string[]>();
  for (const entry of buf
    .subarray(sec.offset, sec.offset + sec.size)
    .toString('latin1')
    .split('\0')) {
    const eq = entry.indexOf('=');
    if (eq <= 0) continue;
    const key = entry.slice(0, eq);
    out.set(key, [...(out.get(key) ?? []), entry.slice(eq + 1)]);
  }
  return out;
}

function checkRange(buf: Buffer, offset: number, length: number, what: string, name: string): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new ElfError(what, `${name}: bad offset or size`);
  }
  if (offset + length > buf.length) {
    throw new ElfError(what, `${name} (${length} bytes at ${offset}) runs past the end of the file (${buf.length})`);
  }
}

function cString(buf: Buffer, start: number, end: number): string {
  const limit = Math.min(end, buf.length);
  let i = start;
  while (i < limit && buf[i] !== 0) i++;
  return buf.subarray(start, i).toString('latin1');
}

function num(v: bigint): number {
  return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER + 1 : Number(v);
}
