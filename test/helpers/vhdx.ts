/** Reading whole VHDX disks through the engine, for the tests' comparisons. */
import { VhdxFile, type OpenOptions } from '../../src/formats/vhdx/vhdx.js';

/** The whole virtual disk of `file` (and its chain), as the engine reads it. */
export async function readWholeVhdx(file: string, opts: OpenOptions = {}): Promise<Buffer> {
  const disk = await VhdxFile.open(file, opts);
  try {
    return await disk.readAt(0, disk.virtualSize);
  } finally {
    await disk.close();
  }
}
