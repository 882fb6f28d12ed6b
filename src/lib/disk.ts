/**
 * `tidemark/disk`: a host's virtual disk, whatever its format, as a library (docs/library.md). `openDisk` opens a
 * VHDX as `VirtualDisk` (its change tracker attached when the disk has one) or a legacy VHD as `VhdVirtualDisk`
 * (never any tracking: `trackingUnavailable` says why, a backup reads it in full), told apart by their magic as the
 * host does; any other format is NOT_SUPPORTED, naming it. Both are `HostDisk`s: a block device (serve it with
 * `tidemark/nbd`) with pause and resume, checkpoint children and their online merge, so code written against it runs
 * VHDX and VHD disks alike. `childExtension` names a checkpoint child as Hyper-V does: `.avhdx`, `.avhd`.
 */
export { openDisk, childExtension, type OpenedDisk, type HostDisk, type HostDiskFile } from '../disk/open.js';
export {
  VirtualDisk,
  openVirtualDisk,
  type VirtualDiskOptions,
  type MergeProgress,
  type OnlineMergeOptions,
  type OnlineMergeResult,
} from '../disk/virtual-disk.js';
export { VhdVirtualDisk, VHD_TRACKING_UNAVAILABLE, type VhdVirtualDiskOptions } from '../disk/vhd-disk.js';
export { detectFormat, describeFormat, type Detection, type DiskFormat } from '../formats/detect.js';
export type {
  AllocationExtent,
  BlockDevice,
  BlockExtent,
  DirtyExtent,
  WriteOptions,
  ZeroOptions,
} from '../disk/device.js';
