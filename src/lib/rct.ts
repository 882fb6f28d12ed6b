/**
 * `tidemark/rct`: resilient change tracking of VHDX disks as a library (docs/library.md, docs/formats/rct.md).
 * Enable tracking on a disk, open it with the tracker attached (`openVirtualDisk`), seal reference ids and ask
 * what changed since one. An id the tracker cannot vouch for answers MISSING_CHANGE_TRACKING_INFORMATION: read
 * the disk in full.
 */
export {
  ChangeTracker,
  COARSE_REGION,
  DEFAULT_GRANULARITY,
  trackingPaths,
  type ChangeRange,
  type ChangesResult,
  type TrackerStatus,
  type TrackingFiles,
} from '../tracking/tracker.js';
export { mergeWithTracking } from '../tracking/merge.js';
export { VirtualDisk, openVirtualDisk, type VirtualDiskOptions } from '../disk/virtual-disk.js';
