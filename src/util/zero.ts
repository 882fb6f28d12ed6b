/** Shared zero bytes and a memcmp-speed all-zero test (convert and backup skip all-zero blocks). */
const ZERO_CHUNK = 1024 * 1024;
export const ZEROES: Buffer = Buffer.alloc(ZERO_CHUNK);

export function isAllZero(buf: Uint8Array): boolean {
  for (let pos = 0; pos < buf.length; pos += ZERO_CHUNK) {
    const end = Math.min(buf.length, pos + ZERO_CHUNK);
    if (Buffer.compare(buf.subarray(pos, end), ZEROES.subarray(0, end - pos)) !== 0) return false;
  }
  return true;
}

/** Yields zero buffers of at most 1 MiB covering `length` bytes. */
export function* zeroPieces(length: number): Generator<Buffer> {
  for (let left = length; left > 0; left -= ZERO_CHUNK) yield ZEROES.subarray(0, Math.min(left, ZERO_CHUNK));
}
