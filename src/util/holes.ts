/**
 * Where a file holds data, from lseek(SEEK_DATA / SEEK_HOLE) through the native addon (native/fs, seek.c;
 * Node has no binding for them). When the call fails the answer is "unknown" and callers read the whole
 * file. TIDEMARK_NO_SEEK_DATA=1 turns hole detection off (tests, benchmarks).
 */
import { constants } from 'node:fs';
import { open } from 'node:fs/promises';
import { nativeFs, type NativeFs } from './native.js';

export interface DataExtent {
  offset: number;
  length: number;
}

/** The SEEK_DATA call of the addon, or null when TIDEMARK_NO_SEEK_DATA=1 turns it off. */
export function seekAddon(): Pick<NativeFs, 'dataExtents'> | null {
  return process.env.TIDEMARK_NO_SEEK_DATA === '1' ? null : nativeFs();
}

/**
 * The data extents of `path` within [0, size), in order; what lies between them reads as zeros.
 * undefined when that cannot be known (turned off, or the file system refused): read everything then.
 */
export async function dataExtents(path: string, size: number): Promise<DataExtent[] | undefined> {
  const seek = seekAddon();
  if (!seek) return undefined;
  let handle;
  try {
    // O_NONBLOCK: a FIFO put in place of the file must not hold this open.
    handle = await open(path, constants.O_RDONLY | constants.O_NONBLOCK);
  } catch {
    return undefined;
  }
  try {
    return dataExtentsOf(handle.fd, 0, size);
  } finally {
    await handle.close();
  }
}

/**
 * The data extents of the open file `fd` within [start, end), at once (lseek is a metadata lookup, no I/O
 * wait worth a thread). undefined when that cannot be known: treat the whole range as data then.
 */
export function dataExtentsOf(fd: number, start: number, end: number): DataExtent[] | undefined {
  if (end <= start) return [];
  const seek = seekAddon();
  if (!seek) return undefined;
  let flat: number[];
  try {
    flat = seek.dataExtents(fd, end, start);
  } catch {
    return undefined;
  }
  const out: DataExtent[] = [];
  for (let i = 0; i + 1 < flat.length; i += 2) out.push({ offset: flat[i], length: flat[i + 1] });
  return out;
}

/** `extents` sorted, with overlapping and touching ones joined. */
export function mergeExtents(extents: DataExtent[]): DataExtent[] {
  const sorted = [...extents].filter((e) => e.length > 0).sort((a, b) => a.offset - b.offset);
  const out: DataExtent[] = [];
  for (const e of sorted) {
    const last = out[out.length - 1];
    if (last && e.offset <= last.offset + last.length) {
      last.length = Math.max(last.length, e.offset + e.length - last.offset);
    } else out.push({ ...e });
  }
  return out;
}
