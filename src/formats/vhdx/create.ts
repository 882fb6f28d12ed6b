/**
 * Creating fixed, dynamic and differencing VHDX files. The file is laid out as Hyper-V and QEMU do:
 * header section, 1 MiB log at 1 MiB, metadata region at 2 MiB, BAT at 3 MiB, then payload.
 */
import { unlink } from 'node:fs/promises';
import path from 'node:path';
import { InvalidArgumentError, TidemarkError } from '../../errors.js';
import { NodeFile } from '../../util/file.js';
import { GUID_ZERO, newGuid, type Guid } from '../../util/guid.js';
import { batRegionLength, computeGeometry, encodeBatEntry, payloadBatIndex } from './bat.js';
import {
  BlockState,
  CREATOR,
  HEADER_OFFSETS,
  ITEM_FILE_PARAMETERS,
  ITEM_LOGICAL_SECTOR_SIZE,
  ITEM_PARENT_LOCATOR,
  ITEM_PHYSICAL_SECTOR_SIZE,
  ITEM_VIRTUAL_DISK_ID,
  ITEM_VIRTUAL_DISK_SIZE,
  MAX_ALLOCATION,
  MAX_BLOCK_SIZE,
  MAX_VIRTUAL_SIZE,
  METADATA_TABLE_SIZE,
  MIN_BLOCK_SIZE,
  MiB,
  PARENT_LOCATOR_TYPE_VHDX,
  REGION_BAT,
  REGION_METADATA,
  REGION_TABLE_OFFSETS,
} from './constants.js';
import { encodeFileIdentifier, encodeHeader, encodeRegionTable } from './header.js';
import { absoluteLocatorPath, relativeLocatorPath } from './locator.js';
import {
  encodeFileParameters,
  encodeMetadataTable,
  encodeParentLocator,
  encodeU32,
  encodeU64,
  formatLinkage,
  type MetadataEntry,
} from './metadata.js';
import { VhdxFile, type OpenOptions } from './vhdx.js';

export const DEFAULT_BLOCK_SIZE = 32 * MiB;
export const DEFAULT_CHILD_BLOCK_SIZE = 2 * MiB;

export interface CreateOptions {
  /** Virtual size in bytes (not for differencing disks: they take the parent's). */
  size?: number;
  type?: 'dynamic' | 'fixed';
  blockSize?: number;
  logicalSectorSize?: 512 | 4096;
  physicalSectorSize?: 512 | 4096;
  /** Creates a differencing disk over this parent. */
  parent?: string;
  /** How to open the parent (allowed roots, path map) when it is itself a differencing disk. */
  parentOpenOptions?: OpenOptions;
  /**
   * The parent already open (a running disk's head, about to be checkpointed): read in place of opening `parent`
   * again, and left open. Its path must be `parent`'s.
   */
  parentFile?: VhdxFile;
  virtualDiskId?: Guid;
  creator?: string;
}

interface Item {
  id: Guid;
  data: Buffer;
  isVirtualDisk: boolean;
  isRequired: boolean;
  isUser?: boolean;
}

const LOG_OFFSET = MiB;
const LOG_LENGTH = MiB;
const METADATA_OFFSET = 2 * MiB;
const BAT_OFFSET = 3 * MiB;

export async function createVhdx(filePath: string, opts: CreateOptions): Promise<void> {
  const items: Item[] = [];
  let virtualSize: number;
  let lss: 512 | 4096;
  let blockSize: number;
  const type = opts.parent ? 'differencing' : (opts.type ?? 'dynamic');

  if (opts.parent) {
    if (opts.size !== undefined)
      throw new InvalidArgumentError('a differencing disk takes its size from the parent; do not give --size');
    if (opts.type !== undefined) throw new InvalidArgumentError('a differencing disk has no --type');
    const parentPath = path.resolve(opts.parent);
    if (opts.parentFile && path.resolve(opts.parentFile.path) !== parentPath)
      throw new InvalidArgumentError(`the open parent is ${opts.parentFile.path}, not ${parentPath}`);
    const parent = opts.parentFile ?? (await VhdxFile.open(parentPath, { ...opts.parentOpenOptions, writable: false }));
    try {
      virtualSize = parent.virtualSize;
      lss = parent.logicalSectorSize;
      blockSize = opts.blockSize ?? DEFAULT_CHILD_BLOCK_SIZE;
      // Copy every virtual-disk item of the parent (MS-VHDX 2.6.1.2), known or not.
      let total = 0;
      for (const e of parent.metadataEntries.filter((m) => m.isVirtualDisk)) {
        total += e.length;
        if (total > MAX_ALLOCATION) throw new TidemarkError('LIMIT_EXCEEDED', 'parent virtual-disk metadata too large');
        const data = await parent.readMetadataItem(e);
        items.push({ id: e.itemId, data, isVirtualDisk: true, isRequired: e.isRequired, isUser: e.isUser });
      }
      const loc = encodeParentLocator({
        locatorType: PARENT_LOCATOR_TYPE_VHDX,
        entries: [
          ['parent_linkage', formatLinkage(parent.header.dataWriteGuid)],
          ['relative_path', relativeLocatorPath(filePath, parentPath)],
          ['absolute_win32_path', absoluteLocatorPath(parentPath)],
        ],
      });
      items.unshift({
        id: ITEM_FILE_PARAMETERS,
        data: encodeFileParameters({ blockSize, leaveBlockAllocated: false, hasParent: true }),
        isVirtualDisk: false,
        isRequired: true,
      });
      items.push({ id: ITEM_PARENT_LOCATOR, data: loc, isVirtualDisk: false, isRequired: true });
    } finally {
      if (!opts.parentFile) await parent.close();
    }
  } else {
    if (opts.size === undefined) throw new InvalidArgumentError('give the virtual size (--size)');
    virtualSize = opts.size;
    lss = opts.logicalSectorSize ?? 512;
    blockSize = opts.blockSize ?? DEFAULT_BLOCK_SIZE;
    const pss = opts.physicalSectorSize ?? 4096;
    if (lss !== 512 && lss !== 4096)
      throw new InvalidArgumentError(`logical sector size ${lss} is neither 512 nor 4096`);
    if (pss !== 512 && pss !== 4096)
      throw new InvalidArgumentError(`physical sector size ${pss} is neither 512 nor 4096`);
    if (!Number.isSafeInteger(virtualSize) || virtualSize <= 0 || virtualSize > MAX_VIRTUAL_SIZE) {
      throw new InvalidArgumentError(`size ${virtualSize} is not between 1 byte and 64 TiB`);
    }
    if (virtualSize % lss !== 0)
      throw new InvalidArgumentError(`size ${virtualSize} is not a multiple of the ${lss}-byte logical sector`);
    items.push(
      {
        id: ITEM_FILE_PARAMETERS,
        data: encodeFileParameters({ blockSize, leaveBlockAllocated: type === 'fixed', hasParent: false }),
        isVirtualDisk: false,
        isRequired: true,
      },
      { id: ITEM_VIRTUAL_DISK_SIZE, data: encodeU64(virtualSize), isVirtualDisk: true, isRequired: true },
      {
        id: ITEM_VIRTUAL_DISK_ID,
        data: Buffer.from(opts.virtualDiskId ?? newGuid()),
        isVirtualDisk: true,
        isRequired: true,
      },
      { id: ITEM_LOGICAL_SECTOR_SIZE, data: encodeU32(lss), isVirtualDisk: true, isRequired: true },
      { id: ITEM_PHYSICAL_SECTOR_SIZE, data: encodeU32(pss), isVirtualDisk: true, isRequired: true },
    );
  }
  if (blockSize < MIN_BLOCK_SIZE || blockSize > MAX_BLOCK_SIZE || (blockSize & (blockSize - 1)) !== 0) {
    throw new InvalidArgumentError(`block size ${blockSize} is not a power of two from 1 MiB to 256 MiB`);
  }
  if (type !== 'fixed' && type !== 'dynamic' && type !== 'differencing')
    throw new InvalidArgumentError(`unknown disk type ${type}`);

  const g = computeGeometry(virtualSize, blockSize, lss, type === 'differencing');
  const batLength = batRegionLength(g);

  // Metadata region: table, then the items one after another.
  const entries: MetadataEntry[] = [];
  let at = METADATA_TABLE_SIZE;
  const itemBytes: Buffer[] = [];
  for (const it of items) {
    entries.push({
      itemId: it.id,
      offset: it.data.length ? at : 0,
      length: it.data.length,
      isUser: it.isUser ?? false,
      isVirtualDisk: it.isVirtualDisk,
      isRequired: it.isRequired,
    });
    itemBytes.push(it.data);
    at += it.data.length;
  }
  const metadataLength = Math.max(MiB, Math.ceil(at / MiB) * MiB);
  const batOffset = Math.max(BAT_OFFSET, METADATA_OFFSET + metadataLength);
  const metadata = Buffer.concat([encodeMetadataTable(entries), ...itemBytes]);

  const fileWriteGuid = newGuid();
  const dataWriteGuid = newGuid();
  const header = {
    sequenceNumber: 0n,
    fileWriteGuid,
    dataWriteGuid,
    logGuid: GUID_ZERO,
    logVersion: 0,
    version: 1,
    logLength: LOG_LENGTH,
    logOffset: LOG_OFFSET,
  };
  const regions = encodeRegionTable([
    { guid: REGION_BAT, fileOffset: batOffset, length: batLength, required: true },
    { guid: REGION_METADATA, fileOffset: METADATA_OFFSET, length: metadataLength, required: true },
  ]);

  // Locked as a writer from its creation: no QEMU tool opens it half written.
  const file = await NodeFile.open(filePath, 'wx', { lock: 'writer' });
  let ok = false;
  try {
    await file.write(encodeFileIdentifier({ creator: opts.creator ?? CREATOR }), 0);
    await file.write(encodeHeader({ ...header, sequenceNumber: 1n }), HEADER_OFFSETS[0]);
    await file.write(encodeHeader({ ...header, sequenceNumber: 2n }), HEADER_OFFSETS[1]);
    await file.write(regions, REGION_TABLE_OFFSETS[0]);
    await file.write(regions, REGION_TABLE_OFFSETS[1]);
    await file.write(metadata, METADATA_OFFSET);
    let end = batOffset + batLength;
    if (type === 'fixed') {
      // Every payload block preallocated, in order; sector-bitmap entries stay NOT_PRESENT.
      const perPage = MiB / 8;
      const page = Buffer.alloc(MiB);
      let pageStart = -1;
      const flushPage = async () => {
        if (pageStart >= 0)
          await file.write(
            page.subarray(0, Math.min(MiB, g.batEntries * 8 - pageStart * 8)),
            batOffset + pageStart * 8,
          );
        page.fill(0);
      };
      for (let b = 0; b < g.dataBlocks; b++) {
        const idx = payloadBatIndex(g, b);
        const p = Math.floor(idx / perPage) * perPage;
        if (p !== pageStart) {
          await flushPage();
          pageStart = p;
        }
        const [lo, hi] = encodeBatEntry(BlockState.FullyPresent, end + b * blockSize);
        page.writeUInt32LE(lo, (idx - p) * 8);
        page.writeUInt32LE(hi, (idx - p) * 8 + 4);
      }
      await flushPage();
      end += g.dataBlocks * blockSize;
    }
    await file.truncate(end);
    await file.datasync();
    ok = true;
  } finally {
    await file.close();
    if (!ok) await unlink(filePath).catch(() => undefined);
  }
}
