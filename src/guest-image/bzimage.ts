/**
 * The decompressed kernel (`vmlinux`, an ELF QEMU boots directly through its PVH entry note) from a
 * bzImage (`vmlinuz`), as the kernel's scripts/extract-vmlinux does it, but exactly: the x86 boot protocol's
 * setup header (2.08+) names the compressed payload's offset and length, so nothing is guessed by scanning.
 * Debian compresses with xz (zstd and gzip are handled too): xz and zstd through their Debian tools.
 */
import { spawn } from 'node:child_process';
import { gunzipSync } from 'node:zlib';
import { TidemarkError } from '../errors.js';
import { isElf } from './elf.js';

const HDRS_MAGIC = 0x53726448; // "HdrS" at 0x202
const MIN_PROTOCOL = 0x0208; // payload_offset / payload_length exist from 2.08

export type PayloadCompression = 'xz' | 'zstd' | 'gzip' | 'lzma' | 'lz4' | 'bzip2' | 'lzo' | 'unknown';

export interface BzImagePayload {
  protocol: string;
  /** offset of the compressed payload in the file */
  offset: number;
  length: number;
  compression: PayloadCompression;
}

/** Decodes the setup header and locates the payload; every field is checked against the file size. */
export function locatePayload(buf: Buffer, what = 'kernel image'): BzImagePayload {
  if (buf.length < 0x250) throw bad(what, `too short for a bzImage (${buf.length} bytes)`);
  if (buf.readUInt16LE(0x1fe) !== 0xaa55 || buf.readUInt32LE(0x202) !== HDRS_MAGIC) {
    throw bad(what, 'no x86 boot sector / "HdrS" setup header: not a bzImage');
  }
  const version = buf.readUInt16LE(0x206);
  if (version < MIN_PROTOCOL) {
    throw bad(what, `boot protocol ${fmtProtocol(version)} is older than 2.08 (no payload fields)`);
  }
  const setupSects = buf[0x1f1] === 0 ? 4 : buf[0x1f1];
  const protectedMode = (setupSects + 1) * 512;
  const payloadOffset = buf.readUInt32LE(0x248);
  const payloadLength = buf.readUInt32LE(0x24c);
  const offset = protectedMode + payloadOffset;
  if (payloadLength === 0 || offset + payloadLength > buf.length) {
    throw bad(what, `payload (${payloadLength} bytes at ${offset}) lies outside the file (${buf.length} bytes)`);
  }
  return { protocol: fmtProtocol(version), offset, length: payloadLength, compression: sniff(buf, offset) };
}

/** The kernel ELF from a bzImage. */
export async function extractVmlinux(buf: Buffer, what = 'kernel image'): Promise<Buffer> {
  const p = locatePayload(buf, what);
  const payload = buf.subarray(p.offset, p.offset + p.length);
  let out: Buffer;
  switch (p.compression) {
    case 'gzip':
      out = gunzipSync(payload);
      break;
    case 'xz':
      // The build appends the decompressed size (4 bytes) after the stream: --single-stream stops before it.
      out = await filter('xz', ['--decompress', '--stdout', '--single-stream'], payload, what);
      break;
    case 'zstd':
      // zstd refuses trailing bytes: cut the 4-byte size the build appends.
      out = await filter(
        'zstd',
        ['--decompress', '--stdout', '--quiet'],
        payload.subarray(0, payload.length - 4),
        what,
      );
      break;
    default:
      throw new TidemarkError(
        'NOT_SUPPORTED',
        `${what}: the kernel payload is ${p.compression}-compressed; xz, zstd and gzip are supported`,
      );
  }
  if (!isElf(out)) throw bad(what, 'the decompressed payload is not an ELF file');
  return out;
}

function sniff(buf: Buffer, o: number): PayloadCompression {
  const b = (i: number) => buf[o + i];
  if (b(0) === 0xfd && b(1) === 0x37 && b(2) === 0x7a && b(3) === 0x58 && b(4) === 0x5a && b(5) === 0) return 'xz';
  if (b(0) === 0x28 && b(1) === 0xb5 && b(2) === 0x2f && b(3) === 0xfd) return 'zstd';
  if (b(0) === 0x1f && (b(1) === 0x8b || b(1) === 0x9e)) return 'gzip';
  if (b(0) === 0x5d && b(1) === 0) return 'lzma';
  if (b(0) === 0x02 && b(1) === 0x21 && b(2) === 0x4c && b(3) === 0x18) return 'lz4';
  if (b(0) === 0x42 && b(1) === 0x5a && b(2) === 0x68) return 'bzip2';
  if (b(0) === 0x89 && b(1) === 0x4c && b(2) === 0x5a && b(3) === 0x4f) return 'lzo';
  return 'unknown';
}

/** Runs a decompressor over `input`, collecting its output (bounded: a kernel is well under 256 MiB). */
function filter(cmd: string, args: string[], input: Buffer, what: string): Promise<Buffer> {
  const MAX = 256 * 1024 * 1024;
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    const chunks: Buffer[] = [];
    let size = 0;
    let stderr = '';
    child.on('error', (err) =>
      reject(
        new TidemarkError(
          'NOT_FOUND',
          `${what}: cannot run ${cmd} (${(err as Error).message}); install it: apt-get install ${cmd === 'xz' ? 'xz-utils' : cmd}`,
        ),
      ),
    );
    child.stdout.on('data', (c: Buffer) => {
      size += c.length;
      if (size > MAX) {
        child.kill();
        return;
      }
      chunks.push(c);
    });
    child.stderr.on('data', (c: Buffer) => {
      if (stderr.length < 4096) stderr += c.toString();
    });
    child.stdin.on('error', () => undefined); // an early exit is reported by 'close'
    child.on('close', (code) => {
      if (size > MAX) reject(bad(what, `${cmd} produced more than ${MAX} bytes`));
      else if (code !== 0) reject(bad(what, `${cmd} failed (exit ${code}): ${stderr.trim()}`));
      else resolve(Buffer.concat(chunks));
    });
    child.stdin.end(input);
  });
}

function fmtProtocol(v: number): string {
  return `${v >> 8}.${(v & 0xff).toString().padStart(2, '0')}`;
}

function bad(what: string, problem: string): TidemarkError {
  return new TidemarkError('INVALID_ARGUMENT', `${what}: ${problem}`);
}
