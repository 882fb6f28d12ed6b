/**
 * `vhd info`: both footer copies, the dynamic header, every parent locator, the BAT's allocation and the
 * chain, as one JSON-ready object (the shape is documented in docs/cli.md and kept stable).
 */
import { TidemarkError } from '../../errors.js';
import { fourCC, platformName } from './constants.js';
import { hex, uuidToString, vhdTimeToIso, type VhdFooter } from './footer.js';
import { chsSectors, qemuVisibleSize } from './geometry.js';
import { VhdFile, type FooterCopy, type VhdOpenOptions } from './vhd.js';

function footerInfo(c: FooterCopy) {
  const base = { where: c.where, offset: c.offset, inUse: c.inUse };
  if (typeof c.footer === 'string') return { ...base, valid: false, problem: c.footer };
  const f: VhdFooter = c.footer;
  return {
    ...base,
    valid: true,
    length: f.length,
    checksum: `0x${hex(f.checksum)}`,
    timeStamp: vhdTimeToIso(f.timeStamp),
    uniqueId: uuidToString(f.uniqueId),
  };
}

function version(v: number): string {
  return `${v >>> 16}.${v & 0xffff}`;
}

export async function vhdInfo(path: string, opts: Pick<VhdOpenOptions, 'allowedRoots' | 'pathMap'> = {}) {
  const disk = await VhdFile.open(path, { ...opts, noParent: true });
  try {
    const f = disk.footer;
    const h = disk.header;
    let bat = null;
    if (h) {
      let allocated = 0;
      for await (const _ of disk.ownBlocks()) allocated++;
      bat = {
        offset: h.tableOffset,
        entries: h.maxTableEntries,
        dataBlocks: disk.layout!.dataBlocks,
        allocatedBlocks: allocated,
        allocatedBytes: allocated * h.blockSize,
        bitmapBytes: disk.layout!.bitmapBytes,
      };
    }
    return {
      path: disk.path,
      format: 'vhd' as const,
      type: disk.diskType,
      creator: { application: f.creatorApp, version: version(f.creatorVersion), hostOs: f.creatorHostOs },
      formatVersion: version(f.version),
      fileSize: disk.fileSize,
      virtualSize: disk.virtualSize,
      originalSize: Number(f.originalSize),
      blockSize: disk.blockSize ?? null,
      uniqueId: disk.uniqueId,
      timeStamp: vhdTimeToIso(f.timeStamp),
      features: { temporary: (f.features & 1) !== 0, raw: f.features },
      savedState: f.savedState !== 0,
      geometry: { ...f.geometry, bytes: chsSectors(f.geometry) * 512 },
      /** What qemu-img -f vpc reports (it sizes by CHS for creators it does not know). */
      qemuVirtualSize: qemuVisibleSize({ ...f, currentSize: disk.virtualSize }),
      footers: disk.footers.map(footerInfo),
      dynamicHeader: h
        ? {
            offset: disk.headerOffset,
            tableOffset: h.tableOffset,
            maxTableEntries: h.maxTableEntries,
            blockSize: h.blockSize,
            checksum: `0x${hex(h.checksum)}`,
            parentUniqueId: uuidToString(h.parentUniqueId),
            parentTimeStamp: vhdTimeToIso(h.parentTimeStamp),
            parentName: h.parentName,
          }
        : null,
      parentLocators: disk.locators.map((l) => ({
        index: l.index + 1,
        platform: platformName(l.entry.code) ?? fourCC(l.entry.code),
        dataSpace: l.entry.dataSpace,
        dataLength: l.entry.dataLength,
        dataOffset: l.entry.dataOffset,
        ...(l.data ? { value: l.data.value } : { problem: l.problem }),
      })),
      bat,
      chain: await vhdChainInfo(path, opts),
      warnings: disk.warnings,
    };
  } finally {
    await disk.close();
  }
}

export type VhdInfo = Awaited<ReturnType<typeof vhdInfo>>;

export interface VhdChainLink {
  path: string;
  type?: string;
  virtualSize?: number;
  uniqueId?: string;
  timeStamp?: string;
  foundBy?: string;
  error?: { code: string; message: string };
}

/** The chain from `path` to its base; a link that cannot be opened is reported, not thrown. */
export async function vhdChainInfo(
  path: string,
  opts: Pick<VhdOpenOptions, 'allowedRoots' | 'pathMap'>,
): Promise<VhdChainLink[]> {
  let disk: VhdFile;
  try {
    disk = await VhdFile.open(path, opts);
  } catch (err) {
    if (!(err instanceof TidemarkError)) throw err;
    return [{ path, error: { code: err.code, message: err.message } }];
  }
  try {
    return disk.chain().map((d) => ({
      path: d.path,
      type: d.diskType,
      virtualSize: d.virtualSize,
      uniqueId: d.uniqueId,
      timeStamp: vhdTimeToIso(d.footer.timeStamp),
      foundBy: d.parentLink?.foundBy,
    }));
  } finally {
    await disk.close();
  }
}
