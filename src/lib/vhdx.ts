/**
 * `tidemark/vhdx`: the VHDX engine as a library (docs/library.md). Create, open, read, write, check, merge and
 * convert VHDX files; `VirtualDisk` is an open disk with its change tracking attached (see `tidemark/rct`).
 */
export {
  VhdxFile,
  type ContentExtent,
  type DiskType,
  type Extent,
  type OpenOptions,
  type ParentLink,
  type ReplayInfo,
  type WriteObserver,
} from '../formats/vhdx/vhdx.js';
export {
  createVhdx,
  DEFAULT_BLOCK_SIZE,
  DEFAULT_CHILD_BLOCK_SIZE,
  type CreateOptions,
} from '../formats/vhdx/create.js';
export {
  vhdxInfo,
  chainInfo,
  batHistogram,
  type VhdxInfo,
  type ChainLink,
  type BatHistogram,
} from '../formats/vhdx/info.js';
export { checkVhdx, type CheckOptions, type CheckReport, type Finding } from '../formats/vhdx/check.js';
export { mergeIntoParent, type MergeOptions, type MergeResult } from '../formats/vhdx/merge.js';
export { convertDisk, type DiskConvertOptions, type DiskConvertResult } from '../tracking/convert.js';
export { detectFormat, describeFormat, type Detection, type DiskFormat } from '../formats/detect.js';
export { VirtualDisk, openVirtualDisk, type VirtualDiskOptions } from '../disk/virtual-disk.js';
export type { BlockDevice, BlockExtent, AllocationExtent, WriteOptions, ZeroOptions } from '../disk/device.js';
