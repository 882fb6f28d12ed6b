/**
 * Disk image formats recognised by their magic numbers, never guessed from a file name or assumed to be
 * raw: VHDX (`vhdxfile` at 0), VHD (the `conectix` footer at the end; dynamic and differencing disks also
 * keep a copy at 0), qcow2 and qcow (`QFI\xfb` and the version), QED, VMDK (a `KDMV`/`COWD` sparse header
 * or a `# Disk DescriptorFile` text descriptor), VDI (its signature at 0x40), Parallels, LUKS and DMG (the
 * `koly` trailer). What carries none of them is `raw`.
 *
 * A pure function over the first and last bytes of a file (`detectFromBytes`) and a helper that reads
 * them (`detectFormat`): engines of other formats hook in here by name.
 */
import { TidemarkError } from '../errors.js';
import { NodeFile, type RandomAccessFile } from '../util/file.js';

export type DiskFormat =
  'vhdx' | 'vhd' | 'qcow2' | 'qcow' | 'qed' | 'vmdk' | 'vdi' | 'parallels' | 'luks' | 'dmg' | 'raw';

export interface Detection {
  format: DiskFormat;
  /** What identified it, for messages (e.g. 'a "conectix" footer at the end'); empty for raw. */
  evidence: string;
}

/** Bytes from offset 0 that detection looks at, and from the end. */
export const DETECT_HEAD_BYTES = 4096;
export const DETECT_TAIL_BYTES = 512;

interface FormatInfo {
  /** How people call it: "a VHD disk". */
  name: string;
  /** qemu-img's name for it (`-f`), to say how to convert it; undefined when qemu-img cannot read it. */
  qemu?: string;
}

const FORMATS: Record<Exclude<DiskFormat, 'raw'>, FormatInfo> = {
  vhdx: { name: 'VHDX', qemu: 'vhdx' },
  vhd: { name: 'VHD', qemu: 'vpc' },
  qcow2: { name: 'qcow2', qemu: 'qcow2' },
  qcow: { name: 'qcow (version 1)', qemu: 'qcow' },
  qed: { name: 'QED', qemu: 'qed' },
  vmdk: { name: 'VMDK', qemu: 'vmdk' },
  vdi: { name: 'VDI', qemu: 'vdi' },
  parallels: { name: 'Parallels', qemu: 'parallels' },
  luks: { name: 'LUKS-encrypted' },
  dmg: { name: 'Apple DMG', qemu: 'dmg' },
};

const latin1 = (b: Uint8Array, at: number, n: number): string =>
  at + n <= b.length ? Buffer.from(b.buffer, b.byteOffset + at, n).toString('latin1') : '';

/**
 * The format of a file from its first bytes (`head`, from offset 0, up to DETECT_HEAD_BYTES) and its last
 * bytes (`tail`, the final min(size, DETECT_TAIL_BYTES) bytes), given its size.
 */
export function detectFromBytes(head: Uint8Array, tail: Uint8Array, size: number): Detection {
  const magic8 = latin1(head, 0, 8);
  if (magic8 === 'vhdxfile') return { format: 'vhdx', evidence: 'the "vhdxfile" identifier at offset 0' };
  if (magic8 === 'conectix') return { format: 'vhd', evidence: 'a "conectix" footer copy at offset 0' };
  const magic4 = latin1(head, 0, 4);
  if (magic4 === 'QFI\xfb' && head.length >= 8) {
    const version = Buffer.from(head.buffer, head.byteOffset, 8).readUInt32BE(4);
    return version === 1
      ? { format: 'qcow', evidence: 'the "QFI\\xfb" magic, version 1' }
      : { format: 'qcow2', evidence: `the "QFI\\xfb" magic, version ${version}` };
  }
  if (magic4 === 'QED\0') return { format: 'qed', evidence: 'the "QED" magic at offset 0' };
  if (magic4 === 'KDMV' || magic4 === 'COWD')
    return { format: 'vmdk', evidence: `a "${magic4}" sparse extent header at offset 0` };
  if (isVmdkDescriptor(head)) return { format: 'vmdk', evidence: 'a VMDK text descriptor' };
  if (head.length >= 0x44 && Buffer.from(head.buffer, head.byteOffset, 0x44).readUInt32LE(0x40) === 0xbeda107f)
    return { format: 'vdi', evidence: 'the VDI signature 0xbeda107f at offset 0x40' };
  const magic16 = latin1(head, 0, 16);
  if (magic16 === 'WithoutFreeSpace' || magic16 === 'WithouFreSpacExt')
    return { format: 'parallels', evidence: `the "${magic16}" signature at offset 0` };
  if (latin1(head, 0, 6) === 'LUKS\xba\xbe') return { format: 'luks', evidence: 'the LUKS header at offset 0' };
  // Fixed VHDs have only the footer: the last 512 bytes (511 in files from before Virtual PC 2004).
  if (size >= 512 && tail.length >= 512) {
    const footer = tail.subarray(tail.length - 512);
    // Only a footer whose checksum holds: a raw disk may end with bytes that merely start with the cookie.
    if (latin1(footer, 0, 8) === 'conectix' && vhdFooterChecksumOk(footer.subarray(0, 512)))
      return { format: 'vhd', evidence: 'a "conectix" footer at the end' };
    if (latin1(footer, 1, 8) === 'conectix' && vhdFooterChecksumOk(footer.subarray(1, 512)))
      return { format: 'vhd', evidence: 'a "conectix" footer (511-byte form) at the end' };
    if (latin1(footer, 0, 4) === 'koly' && Buffer.from(footer).readUInt32BE(8) === 512)
      return { format: 'dmg', evidence: 'a "koly" trailer at the end' };
  }
  return { format: 'raw', evidence: '' };
}

/** The VHD footer checksum (at 64): the ones' complement of the byte sum with that field taken as zero. */
function vhdFooterChecksumOk(footer: Uint8Array): boolean {
  if (footer.length < 68) return false;
  let sum = 0;
  for (let i = 0; i < footer.length; i++) if (i < 64 || i >= 68) sum += footer[i];
  const stored = ((footer[64] << 24) | (footer[65] << 16) | (footer[66] << 8) | footer[67]) >>> 0;
  return ~sum >>> 0 === stored;
}

/**
 * A VMDK text descriptor: comment lines (`# Disk DescriptorFile` first, normally) and blank lines, then a
 * `version=1|2|3` line, as VMware and QEMU write them.
 */
function isVmdkDescriptor(head: Uint8Array): boolean {
  const text = latin1(head, 0, Math.min(head.length, 1024));
  if (text.startsWith('# Disk DescriptorFile')) return true;
  for (const line of text.split('\n').slice(0, -1)) {
    const l = line.replace(/\r$/, '');
    if (l.startsWith('#') || l.trim() === '') continue;
    return /^version=[123]$/.test(l);
  }
  return false;
}

/** Reads the bytes detection needs from an open file. */
export async function detectOpenFile(file: RandomAccessFile): Promise<Detection> {
  const size = file.size();
  const head = Buffer.alloc(Math.min(size, DETECT_HEAD_BYTES));
  if (head.length > 0) await file.read(head, 0);
  const tail = Buffer.alloc(Math.min(size, DETECT_TAIL_BYTES));
  if (tail.length > 0) await file.read(tail, size - tail.length);
  return detectFromBytes(head, tail, size);
}

/** The format of the file at `path` by its magic (raw when it carries none). */
export async function detectFormat(path: string): Promise<Detection> {
  const file = await NodeFile.open(path, 'r');
  try {
    return await detectOpenFile(file);
  } finally {
    await file.close();
  }
}

/** "a VHD disk", "a qcow2 disk", "a LUKS-encrypted disk". */
export function describeFormat(format: DiskFormat): string {
  if (format === 'raw') return 'a raw image';
  return `a ${FORMATS[format].name} disk`;
}

/**
 * NOT_SUPPORTED for a file in a format the caller cannot read: one line naming the format, what showed
 * it, and how to get a VHDX from it (`also`: one more way out the caller offers).
 */
export function unsupportedFormatError(
  path: string,
  d: Detection,
  opts: { reader?: string; also?: string } = {},
): TidemarkError {
  if (d.format === 'raw' || d.format === 'vhdx')
    throw new Error(`unsupportedFormatError: ${d.format} is not an unsupported format`);
  const info = FORMATS[d.format];
  const how = info.qemu
    ? `convert it first, e.g. qemu-img convert -f ${info.qemu} -O vhdx ${path} OUT.vhdx`
    : 'open it with its own tools first';
  return new TidemarkError(
    'NOT_SUPPORTED',
    `${path} is ${describeFormat(d.format)} (${d.evidence}), which ${opts.reader ?? "Tidemark's VHDX engine"} does not read: ${how}${opts.also ? `; ${opts.also}` : ''}`,
    { path, format: d.format },
  );
}
