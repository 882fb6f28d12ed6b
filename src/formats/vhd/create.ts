/**
 * Creating fixed, dynamic and differencing VHDs. Layout of dynamic and differencing disks: footer copy
 * at 0, dynamic header at 512, BAT at 1536 (whole sectors), then the parent locators' data (one sector
 * run each), then blocks, then the footer. Fixed disks: the data (a sparse file), then the footer.
 *
 * The file is built under a temporary name in the same directory and linked into place only when it is
 * complete and durable: a crash during `create` never leaves a half-made disk under the name asked for.
 */
import { randomBytes } from 'node:crypto';
import { link, rename, stat, unlink } from 'node:fs/promises';
import path from 'node:path';
import { InvalidArgumentError, TidemarkError, fromSystemError } from '../../errors.js';
import { syncDirectory } from '../../util/atomic.js';
import { NodeFile } from '../../util/file.js';
import { absoluteLocatorPath, relativeLocatorPath } from '../vhdx/locator.js';
import { batBytes } from './bat.js';
import {
  CREATE_BLOCK_SIZES,
  CREATOR_APP,
  CREATOR_HOST_OS,
  CREATOR_VERSION,
  DEFAULT_BLOCK_SIZE,
  DYNAMIC_HEADER_SIZE,
  DiskType,
  FEATURE_RESERVED,
  FOOTER_SIZE,
  FORMAT_VERSION,
  MAX_VIRTUAL_SIZE,
  NO_OFFSET,
  PLATFORM,
  SECTOR,
  type PlatformName,
} from './constants.js';
import { encodeFooter, vhdNow, type VhdFooter } from './footer.js';
import { chsGeometry, chsRounded, type Chs } from './geometry.js';
import { encodeDynamicHeader, type LocatorEntry } from './header.js';
import { encodeLocatorData } from './locator.js';
import { VhdFile, type VhdOpenOptions } from './vhd.js';

export interface VhdCreateOptions {
  /** Virtual size in bytes, a multiple of 512 (not for differencing disks: they take the parent's). */
  size?: number;
  type?: 'fixed' | 'dynamic';
  /** 512 KiB, 1 MiB or 2 MiB (the default); a differencing disk defaults to its parent's. */
  blockSize?: number;
  /** Creates a differencing disk over this parent (a VHD). */
  parent?: string;
  /** How to open the parent (allowed roots, path map) when it is itself a differencing disk. */
  parentOpenOptions?: Pick<VhdOpenOptions, 'allowedRoots' | 'pathMap'>;
  /**
   * Round the size up to a whole CHS geometry, so readers that size a disk by its geometry (Virtual PC,
   * QEMU for creators it does not know) see all of it, as `qemu-img create -f vpc` does by default.
   */
  chsAligned?: boolean;
  /** The footer's unique id (16 bytes); default: a random UUID. */
  uniqueId?: Buffer;
  /** Locator forms a differencing disk records (default: W2ru, W2ku and MacX). */
  locators?: PlatformName[];
}

export const DEFAULT_LOCATORS: PlatformName[] = ['W2ru', 'W2ku', 'MacX'];

/** A random RFC 4122 version 4 UUID, in network byte order as the footer stores it. */
export function newUniqueId(): Buffer {
  const b = randomBytes(16);
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  return b;
}

/** W2ku as Tidemark writes it on POSIX hosts: `Z:\path\to\parent.vhd` (Z: standing for the root). */
export function windowsAbsolutePath(parentPath: string): string {
  return absoluteLocatorPath(parentPath).replace(/^\\\\\?\\/, '');
}

export async function createVhd(filePath: string, opts: VhdCreateOptions): Promise<void> {
  const target = path.resolve(filePath);
  let size: number;
  let blockSize: number;
  let type: DiskType;
  let geometry: Chs | undefined;
  let parentInfo:
    | { uniqueId: Buffer; timeStamp: number; name: string; locators: [PlatformName, Buffer][]; footer: VhdFooter }
    | undefined;

  if (opts.parent) {
    if (opts.size !== undefined)
      throw new InvalidArgumentError('a differencing disk takes its size from the parent; do not give --size');
    if (opts.type !== undefined) throw new InvalidArgumentError('a differencing disk has no --type');
    const parentPath = path.resolve(opts.parent);
    const parent = await VhdFile.open(parentPath, { ...opts.parentOpenOptions, writable: false });
    try {
      size = parent.virtualSize;
      blockSize = opts.blockSize ?? parent.blockSize ?? DEFAULT_BLOCK_SIZE;
      const forms = opts.locators ?? DEFAULT_LOCATORS;
      const values: Record<PlatformName, string> = {
        W2ru: relativeLocatorPath(target, parentPath),
        W2ku: windowsAbsolutePath(parentPath),
        Wi2r: relativeLocatorPath(target, parentPath),
        Wi2k: windowsAbsolutePath(parentPath),
        MacX: parentPath,
        Mac: parentPath,
      };
      parentInfo = {
        uniqueId: parent.footer.uniqueId,
        timeStamp: parent.footer.timeStamp,
        name: path.basename(parentPath),
        locators: forms.map((p) => [p, encodeLocatorData(p, values[p])]),
        footer: parent.footer,
      };
    } finally {
      await parent.close();
    }
    type = DiskType.Differencing;
  } else {
    if (opts.size === undefined) throw new InvalidArgumentError('give the virtual size (--size)');
    size = opts.size;
    if (opts.chsAligned && Number.isSafeInteger(size) && size > 0) ({ size, geometry } = chsRounded(size));
    blockSize = opts.blockSize ?? DEFAULT_BLOCK_SIZE;
    type = opts.type === 'fixed' ? DiskType.Fixed : DiskType.Dynamic;
    if (opts.type !== undefined && opts.type !== 'fixed' && opts.type !== 'dynamic')
      throw new InvalidArgumentError(`unknown disk type ${String(opts.type)}`);
  }
  if (!Number.isSafeInteger(size) || size <= 0 || size > MAX_VIRTUAL_SIZE) {
    throw new InvalidArgumentError(`size ${size} is not between 1 byte and 2040 GiB`);
  }
  if (size % SECTOR !== 0) throw new InvalidArgumentError(`size ${size} is not a multiple of 512 bytes`);
  if (type !== DiskType.Fixed && !(CREATE_BLOCK_SIZES as readonly number[]).includes(blockSize)) {
    throw new InvalidArgumentError(`block size ${blockSize} is not 512K, 1M or 2M`);
  }
  if (opts.uniqueId && opts.uniqueId.length !== 16) throw new InvalidArgumentError('a unique id is 16 bytes');

  const footer = encodeFooter({
    features: FEATURE_RESERVED,
    version: FORMAT_VERSION,
    dataOffset: type === DiskType.Fixed ? NO_OFFSET : BigInt(FOOTER_SIZE),
    timeStamp: vhdNow(),
    creatorApp: CREATOR_APP,
    creatorVersion: CREATOR_VERSION,
    creatorHostOs: CREATOR_HOST_OS,
    originalSize: BigInt(size),
    currentSize: BigInt(size),
    geometry: parentInfo?.footer.geometry ?? geometry ?? chsGeometry(size / SECTOR),
    diskType: type,
    uniqueId: opts.uniqueId ?? newUniqueId(),
    savedState: 0,
  });

  await stat(target).then(
    () => {
      throw new TidemarkError('ALREADY_EXISTS', `cannot create ${target}: file exists`, { path: target });
    },
    (err: NodeJS.ErrnoException) => {
      if (err.code !== 'ENOENT') throw fromSystemError(err, 'create', target);
    },
  );
  const tmp = path.join(
    path.dirname(target),
    `.${path.basename(target)}.tidemark-tmp-${process.pid}-${randomBytes(4).toString('hex')}`,
  );
  const file = await NodeFile.open(tmp, 'wx', { lock: 'writer' });
  let ok = false;
  try {
    if (type === DiskType.Fixed) {
      await file.truncate(size);
      await file.write(footer, size);
    } else {
      const entries = Math.ceil(size / blockSize);
      const tableOffset = FOOTER_SIZE + DYNAMIC_HEADER_SIZE;
      let at = tableOffset + batBytes(entries);
      const locators: LocatorEntry[] = [];
      const data: [number, Buffer][] = [];
      for (const [platform, bytes] of parentInfo?.locators ?? []) {
        const sectors = Math.ceil(bytes.length / SECTOR);
        locators.push({
          code: PLATFORM[platform],
          dataSpace: sectors, // the specification's unit: 512-byte sectors
          dataLength: bytes.length,
          reserved: 0,
          dataOffset: at,
        });
        data.push([at, bytes]);
        at += sectors * SECTOR;
      }
      const header = encodeDynamicHeader({
        tableOffset,
        maxTableEntries: entries,
        blockSize,
        parentUniqueId: parentInfo?.uniqueId ?? Buffer.alloc(16),
        parentTimeStamp: parentInfo?.timeStamp ?? 0,
        parentName: parentInfo?.name ?? '',
        locators,
      });
      await file.truncate(at + FOOTER_SIZE);
      await file.write(footer, 0);
      await file.write(header, FOOTER_SIZE);
      const bat = Buffer.alloc(batBytes(entries), 0xff);
      await file.write(bat, tableOffset);
      for (const [o, bytes] of data) await file.write(bytes, o);
      await file.write(footer, at);
    }
    await file.datasync();
    await file.close();
    await linkIntoPlace(tmp, target);
    ok = true;
  } finally {
    if (!ok) {
      await file.close().catch(() => undefined);
      await unlink(tmp).catch(() => undefined);
    }
  }
}

/** Gives the finished file its name without replacing anything there, durably. */
async function linkIntoPlace(tmp: string, target: string): Promise<void> {
  try {
    await link(tmp, target);
    await unlink(tmp);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    if (e.code === 'EEXIST') throw new TidemarkError('ALREADY_EXISTS', `cannot create ${target}: file exists`);
    if (e.code !== 'EPERM' && e.code !== 'ENOTSUP' && e.code !== 'EOPNOTSUPP' && e.code !== 'EXDEV') {
      throw fromSystemError(err, 'create', target);
    }
    // A file system without hard links: rename (the existence check above makes a clash unlikely).
    await rename(tmp, target).catch((e2) => Promise.reject(fromSystemError(e2, 'create', target)));
  }
  await syncDirectory(path.dirname(target));
}
