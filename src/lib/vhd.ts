/**
 * `tidemark/vhd`: the legacy VHD engine as a library (docs/library.md), laid out as `tidemark/vhdx`;
 * `VhdVirtualDisk` is an open VHD chain as the host runs it (no change tracking; see `tidemark/disk`).
 */
export {
  VhdFile,
  type VhdDiskType,
  type VhdLocator,
  type VhdOpenOptions,
  type VhdParentLink,
  type Extent,
} from '../formats/vhd/vhd.js';
export { createVhd, DEFAULT_LOCATORS, type VhdCreateOptions } from '../formats/vhd/create.js';
export { vhdInfo, vhdChainInfo, type VhdInfo, type VhdChainLink } from '../formats/vhd/info.js';
export { checkVhd, type VhdCheckOptions, type CheckReport, type Finding } from '../formats/vhd/check.js';
export { mergeVhd, type VhdMergeOptions, type VhdMergeResult } from '../formats/vhd/merge.js';
export { convertDisk, type DiskConvertOptions, type DiskConvertResult } from '../tracking/convert.js';
export { detectFormat, describeFormat, type Detection, type DiskFormat } from '../formats/detect.js';
export { VhdVirtualDisk, VHD_TRACKING_UNAVAILABLE, type VhdVirtualDiskOptions } from '../disk/vhd-disk.js';
export type { BlockDevice, BlockExtent, AllocationExtent, WriteOptions, ZeroOptions } from '../disk/device.js';
