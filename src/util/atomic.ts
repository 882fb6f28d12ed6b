import { open, rename, unlink } from 'node:fs/promises';
import path from 'node:path';
import { fromSystemError } from '../errors.js';

/** Replaces `file` with `data` all at once: temp file, fsync, rename, fsync of the directory. */
export async function writeFileAtomic(file: string, data: string | Uint8Array, mode = 0o644): Promise<void> {
  const tmp = `${file}.tmp-${process.pid}-${Math.random().toString(36).slice(2)}`;
  try {
    const fh = await open(tmp, 'wx', mode);
    try {
      await fh.writeFile(data);
      await fh.datasync();
    } finally {
      await fh.close();
    }
    await rename(tmp, file);
    await syncDirectory(path.dirname(file));
  } catch (err) {
    await unlink(tmp).catch(() => undefined);
    throw fromSystemError(err, 'write', file);
  }
}

/** Makes a directory's entries (a rename, a new or deleted file) durable. */
export async function syncDirectory(dir: string): Promise<void> {
  const fh = await open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}
