/**
 * What a block-level user (the NBD server, a backup reader) sees of a virtual disk. The disk layer
 * (`VirtualDisk`) implements it over VHDX chains; tests may implement it in memory.
 *
 * Errors are TidemarkErrors: READ_ONLY for a change to a read-only device, INVALID_ARGUMENT for a range
 * outside the device, NOT_SUPPORTED for a fast zero that would not be fast, CLOSED after close,
 * MISSING_CHANGE_TRACKING_INFORMATION for a dirty context the tracker cannot vouch for.
 */

export interface BlockExtent {
  offset: number;
  length: number;
}

/** `base:allocation`: a hole reads as zeros and holds no data of its own; zero = reads as zeros. */
export interface AllocationExtent extends BlockExtent {
  hole: boolean;
  zero: boolean;
}

/** `qemu:dirty-bitmap:NAME`: dirty = changed since the sealed id NAME. */
export interface DirtyExtent extends BlockExtent {
  dirty: boolean;
}

export interface WriteOptions {
  /** Force unit access: durable before the call resolves. */
  fua?: boolean;
}

export interface ZeroOptions extends WriteOptions {
  /** The range must stay allocated (NBD_CMD_FLAG_NO_HOLE). */
  noHole?: boolean;
  /** Fail with NOT_SUPPORTED instead of zeroing slowly (NBD_CMD_FLAG_FAST_ZERO). */
  fast?: boolean;
}

export interface BlockDevice {
  /** Virtual size in bytes. */
  readonly size: number;
  readonly readOnly: boolean;
  /** Smallest unit written without read-modify-write (the logical sector size). */
  readonly minimumBlockSize: number;
  /** The unit that is cheapest to read and write (the VHDX block size, capped at 32 MiB). */
  readonly preferredBlockSize: number;

  read(offset: number, length: number): Promise<Buffer>;
  /** Reads into the caller's buffer (lets a server reuse its buffers); optional. */
  readInto?(dst: Uint8Array, offset: number): Promise<void>;
  write(offset: number, data: Uint8Array, opts?: WriteOptions): Promise<void>;
  /** Every write acknowledged before this call is durable when it resolves. */
  flush(): Promise<void>;
  /** The range may read as zeros afterwards (discard). */
  trim(offset: number, length: number, opts?: WriteOptions): Promise<void>;
  writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void>;

  /** Allocation of [offset, offset+length): contiguous extents covering at least the first byte. */
  blockStatus(offset: number, length: number): Promise<AllocationExtent[]>;
  /** Names usable as `qemu:dirty-bitmap:NAME` (sealed change-tracking ids), newest last; [] without tracking. */
  dirtyContexts(): Promise<string[]>;
  /** Changes since NAME over [offset, offset+length): contiguous extents covering at least the first byte. */
  dirtyStatus(name: string, offset: number, length: number): Promise<DirtyExtent[]>;
}
