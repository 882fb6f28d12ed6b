/**
 * Storage-snapshot providers (the VSS system / hardware providers of Hyper-V's model): one interface,
 * one conformance suite (test/snapshot/conformance.ts). A snapshot covers a set of files in one instant;
 * the host holds writes to the set (flush-and-hold) around `commit`, which must therefore be quick.
 */
import type { RandomAccessFile } from '../util/file.js';

export interface SnapshotOptions {
  /** Directory under which the provider keeps its diff areas / clones (one sub-directory per snapshot). */
  diffAreaRoot: string;
}

export interface SnapshotStats {
  /** Bytes held by the snapshot outside the live files (diff area, or 0 for clones sharing extents). */
  diffAreaBytes: number;
  /** Extents preserved so far because the live file was overwritten. */
  preservedExtents: number;
}

export interface StorageSnapshot {
  readonly id: string;
  readonly provider: string;
  readonly createdAt: Date;
  /** Absolute paths of the files in the set, as given to `prepare`. */
  readonly files: readonly string[];
  /** Every file of the set as it was at the instant of commit; read-only (writes fail with READ_ONLY). */
  openFile(path: string): Promise<RandomAccessFile>;
  stats(): SnapshotStats;
  /** Frees the diff area / clones. Views opened from it fail with CLOSED afterwards. */
  release(): Promise<void>;
}

/** Everything slow is done in `prepare`; `commit` is the instant. */
export interface PreparedSnapshot {
  commit(): Promise<StorageSnapshot>;
  abort(): Promise<void>;
}

export interface SnapshotProvider {
  readonly name: string;
  /** undefined when this provider can snapshot these files; otherwise the reason it cannot (NOT_SUPPORTED). */
  supports(files: string[], opts: SnapshotOptions): Promise<string | undefined>;
  prepare(files: string[], opts: SnapshotOptions): Promise<PreparedSnapshot>;
  /** After a crash: removes every diff area left under `diffAreaRoot`; returns how many it removed. */
  recover(opts: SnapshotOptions): Promise<number>;
}
