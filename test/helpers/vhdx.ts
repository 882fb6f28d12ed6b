/** Reading whole VHDX disks through the engine, for the tests' comparisons. */
import { VhdxFile, type OpenOptions } from '../../src/formats/vhdx/vhdx.js';

const PIECE = 64 * 2 ** 20;

/** The whole virtual disk of `file` (and its chain), as the engine reads it, in 64 MiB reads (one read is capped). */
export async function readWholeVhdx(file: string, opts: OpenOptions = {}): Promise<Buffer> {
  const disk = await VhdxFile.open(file, opts);
  try {
    const out = Buffer.alloc(disk.virtualSize);
    for (let at = 0; at < out.length; at += PIECE) {
      await disk.read(out.subarray(at, Math.min(out.length, at + PIECE)), at);
    }
    return out;
  } finally {
    await disk.close();
  }
}
