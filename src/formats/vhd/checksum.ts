/**
 * The VHD checksum (footer and dynamic header): the ones' complement of the sum of every byte of the
 * structure, the 4-byte checksum field counted as zero.
 */
export function vhdChecksum(buf: Uint8Array, fieldOffset: number): number {
  let sum = 0;
  for (let i = 0; i < buf.length; i++) {
    if (i >= fieldOffset && i < fieldOffset + 4) continue;
    sum += buf[i];
  }
  return ~sum >>> 0;
}
