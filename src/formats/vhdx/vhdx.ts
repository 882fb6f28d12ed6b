/**
 * An open VHDX file (and, through its parent, a differencing chain): open with log replay, read,
 * write, trim, write-zeroes and flush. Every BAT, sector-bitmap and metadata change goes through the
 * metadata log at flush time (entry, flush, apply); payload data is written in place.
 */
import { realpath } from 'node:fs/promises';
import path from 'node:path';
import { TidemarkError, VhdxCorruptError } from '../../errors.js';
import { NodeFile, PatchedFile, type RandomAccessFile } from '../../util/file.js';
import { FileTypeError } from '../../util/safe-open.js';
import { detectFromBytes, DETECT_HEAD_BYTES, DETECT_TAIL_BYTES, unsupportedFormatError } from '../detect.js';
import { GUID_ZERO, guidEquals, guidToString, isZeroGuid, newGuid, type Guid } from '../../util/guid.js';
import { RwLock } from '../../util/rwlock.js';
import { isAllZero, zeroPieces } from '../../util/zero.js';
import { checkRange } from '../../util/range.js';
import {
  bitmapBatIndex,
  computeGeometry,
  decodeBatEntry,
  encodeBatEntry,
  payloadBatIndex,
  type BatEntry,
  type Geometry,
} from './bat.js';
import {
  BlockState,
  HEADER_OFFSETS,
  HEADER_SECTION_SIZE,
  HEADER_SIZE,
  ITEM_FILE_PARAMETERS,
  ITEM_LOGICAL_SECTOR_SIZE,
  ITEM_PARENT_LOCATOR,
  ITEM_PHYSICAL_SECTOR_SIZE,
  ITEM_VIRTUAL_DISK_ID,
  ITEM_VIRTUAL_DISK_SIZE,
  LOG_SECTOR,
  MAX_ALLOCATION,
  MAX_CHAIN_DEPTH,
  MAX_FILE_OFFSET,
  MAX_LOG_LENGTH,
  METADATA_TABLE_SIZE,
  MiB,
  REGION_TABLE_OFFSETS,
  REGION_TABLE_SIZE,
  SB_NOT_PRESENT,
  SB_PRESENT,
  SIG_FILE,
} from './constants.js';
import {
  decodeFileIdentifier,
  decodeHeader,
  decodeRegionTable,
  encodeHeader,
  pickCurrentHeader,
  validateRegionTable,
  type FileIdentifier,
  type RegionEntry,
  type RegionTable,
  type VhdxHeader,
} from './header.js';
import {
  absoluteLocatorPath,
  parentCandidates,
  realRoots,
  relativeLocatorPath,
  resolveInsideRoots,
  type ParentCandidate,
} from './locator.js';
import { LogWriter, planReplay, type LogOp } from './log.js';
import { MetaCache } from './metacache.js';
import {
  decodeFileParameters,
  decodeMetadataTable,
  decodeParentLocator,
  decodeSectorSize,
  decodeVirtualDiskSize,
  encodeMetadataTable,
  encodeParentLocator,
  formatLinkage,
  isKnownItem,
  isVhdxLocator,
  locatorGet,
  locatorSet,
  parseLinkage,
  type FileParameters,
  type MetadataEntry,
  type ParentLocator,
} from './metadata.js';
import {
  describeEntry,
  describeProblems,
  Placement,
  structureSpans,
  type Damaged,
  type ScanOptions,
  type Span,
} from './placement.js';

export interface OpenOptions {
  /** Open for writing (replays the log in place). Default: read-only (replays in memory). */
  writable?: boolean;
  /** Directories parents may be opened from. Default: the directory of the disk being opened. */
  allowedRoots?: string[];
  /** Windows drive letters / volume GUIDs / shares mapped to host directories (see locator.ts). */
  pathMap?: Record<string, string>;
  /** Do not open the parent of a differencing disk (info, check, merge). Reads that need it then fail. */
  noParent?: boolean;
  /**
   * Opens the files of the chain (default: the live file system). A storage snapshot passes its view here,
   * so a chain is read as it was at the snapshot's instant.
   */
  openFile?: (path: string, writable: boolean) => Promise<RandomAccessFile>;
  /**
   * An open disk to use as the parent instead of opening the file the locator leads to (that file must be
   * this disk's): a checkpoint opens its new child over the live head. Its DataWriteGuid, virtual size and
   * logical sector size are checked as for a parent opened from disk. The child owns it from then on
   * (closing the child closes it); the caller retires it (`retire`) before the child is written.
   */
  parent?: VhdxFile;
}

/** Told about every guest-visible change before it is issued to the file (the change tracker hooks in here). */
export interface WriteObserver {
  beforeChange(offset: number, length: number): Promise<void> | void;
  /** At the start of a clean close, while the file is still open (not before `abandon`). */
  beforeClose?(): Promise<void>;
  /** After a clean close (not after `abandon`). */
  afterClose?(): Promise<void>;
}

export type DiskType = 'fixed' | 'dynamic' | 'differencing';

export interface ReplayInfo {
  entries: number;
  inMemory: boolean;
}

export interface ParentLink {
  path: string;
  foundBy: ParentCandidate['key'];
  tried: { key: string; value: string; hostPath?: string; outcome: string }[];
}

interface HeaderState {
  header: VhdxHeader;
  slot: 0 | 1;
}

/** A virtual range and what covers it, as reported by allocation queries. */
export interface Extent {
  offset: number;
  length: number;
}

/** An allocated range of the virtual disk; `zero`: it is certain to read zeros. */
export interface ContentExtent {
  offset: number;
  length: number;
  zero: boolean;
}

/** The byte ranges of a freshly placed block never written since (sorted, disjoint). */
interface FreshBlock {
  gaps: [number, number][];
}
/** Repairs commit once this many metadata sectors are pending (16 MiB), and list this many entries. */
const REPAIR_COMMIT_SECTORS = 4096;
const MAX_REPAIR_LINES = 100;
/** Piece size of the copies a repair makes. */
const COPY_PIECE = 4 * MiB;
/** Blocks tracked as fresh at most (oldest forgotten first), and gaps per block: a bounded map. */
const MAX_FRESH_BLOCKS = 4096;
const MAX_FRESH_GAPS = 64;

export class VhdxFile {
  readonly path: string;
  readonly identifier: FileIdentifier;
  /** Both header slots as decoded (a string says why a slot is invalid). */
  readonly headerSlots: [VhdxHeader | string, VhdxHeader | string];
  readonly regionTables: [RegionTable | string, RegionTable | string];
  readonly regionTableInUse: 0 | 1;
  readonly batRegion: RegionEntry;
  readonly metadataRegion: RegionEntry;
  readonly metadataEntries: MetadataEntry[];
  readonly params: FileParameters;
  readonly virtualSize: number;
  readonly virtualDiskId: Guid;
  readonly logicalSectorSize: 512 | 4096;
  readonly physicalSectorSize: 512 | 4096;
  readonly geometry: Geometry;
  readonly replay: ReplayInfo | undefined;
  /** Recoverable oddities noticed while opening (a damaged header copy, a stale region table...). */
  readonly warnings: string[];
  parentLocator: ParentLocator | undefined;
  parent: VhdxFile | undefined;
  parentLink: ParentLink | undefined;
  observer: WriteObserver | undefined;

  private canWrite: boolean;
  private file: RandomAccessFile;
  private headerState: HeaderState;
  private cache: MetaCache;
  private lock = new RwLock();
  private fileEnd = 0;
  /** Where every allocated entry lies and what is wrong with it (scanned at open; see placement.ts). */
  private placementScan!: Placement;
  /**
   * Payload blocks this instance allocated at the end of the file, with the byte ranges inside them
   * never written since: those are holes of the host file and read as zeros, so zeroing them (nbdcopy
   * and qemu-img zero every gap between data) writes nothing. Keyed by BAT index; setBatEntry drops an
   * entry, so one exists only while its block stays where it was placed.
   */
  private readonly fresh = new Map<number, FreshBlock>();
  private logWriter: LogWriter | undefined;
  /** BAT entries set since the last commit (for `adoptHeadersOnDisk`, which must keep them). */
  private readonly batChanged = new Set<number>();
  private fileWriteGuidChanged = false;
  private dataWriteGuidChanged = false;
  private nextDataWriteGuid: Guid | undefined;
  private closed = false;

  private constructor(init: {
    path: string;
    writable: boolean;
    file: RandomAccessFile;
    identifier: FileIdentifier;
    headerSlots: [VhdxHeader | string, VhdxHeader | string];
    headerState: HeaderState;
    regionTables: [RegionTable | string, RegionTable | string];
    regionTableInUse: 0 | 1;
    batRegion: RegionEntry;
    metadataRegion: RegionEntry;
    metadataEntries: MetadataEntry[];
    params: FileParameters;
    virtualSize: number;
    virtualDiskId: Guid;
    logicalSectorSize: 512 | 4096;
    physicalSectorSize: 512 | 4096;
    parentLocator: ParentLocator | undefined;
    replay: ReplayInfo | undefined;
    warnings: string[];
    fileWriteGuidChanged: boolean;
  }) {
    this.path = init.path;
    this.canWrite = init.writable;
    this.file = init.file;
    this.identifier = init.identifier;
    this.headerSlots = init.headerSlots;
    this.headerState = init.headerState;
    this.regionTables = init.regionTables;
    this.regionTableInUse = init.regionTableInUse;
    this.batRegion = init.batRegion;
    this.metadataRegion = init.metadataRegion;
    this.metadataEntries = init.metadataEntries;
    this.params = init.params;
    this.virtualSize = init.virtualSize;
    this.virtualDiskId = init.virtualDiskId;
    this.logicalSectorSize = init.logicalSectorSize;
    this.physicalSectorSize = init.physicalSectorSize;
    this.parentLocator = init.parentLocator;
    this.replay = init.replay;
    this.warnings = init.warnings;
    this.fileWriteGuidChanged = init.fileWriteGuidChanged;
    this.geometry = computeGeometry(
      init.virtualSize,
      init.params.blockSize,
      init.logicalSectorSize,
      init.params.hasParent,
    );
    this.cache = new MetaCache(init.file);
  }

  // ---------------------------------------------------------------- open

  static async open(filePath: string, opts: OpenOptions = {}): Promise<VhdxFile> {
    const roots = await realRoots(opts.allowedRoots ?? [path.dirname(path.resolve(filePath))]);
    return VhdxFile.openInChain(path.resolve(filePath), opts, roots, 0);
  }

  private static async openInChain(
    filePath: string,
    opts: OpenOptions,
    roots: string[],
    depth: number,
  ): Promise<VhdxFile> {
    const writable = opts.writable ?? false;
    // The live file takes QEMU's image locks (writer, or reader for a read-only open and every parent);
    // a storage snapshot's view reads a copy and takes none.
    const base = opts.openFile
      ? await opts.openFile(filePath, writable)
      : await NodeFile.open(filePath, writable ? 'r+' : 'r', { lock: writable ? 'writer' : 'reader' });
    let disk: VhdxFile | undefined;
    try {
      disk = await VhdxFile.decode(filePath, base, writable);
      if (opts.parent && !disk.params.hasParent)
        throw new TidemarkError('INVALID_ARGUMENT', `${filePath} is not a differencing disk: it takes no parent`);
      if (disk.params.hasParent && !opts.noParent) {
        if (depth + 1 >= MAX_CHAIN_DEPTH) {
          throw new VhdxCorruptError(
            'parent locator',
            undefined,
            `chain deeper than ${MAX_CHAIN_DEPTH} disks (a locator loop?)`,
          );
        }
        if (opts.parent) await disk.adoptParent(opts.parent, opts, roots);
        else await disk.attachParent(opts, roots, depth);
      }
      // A damaged file is not modified at all, not even its locator paths.
      if (writable && disk.parent && disk.placementScan.clean) await disk.refreshParentPaths();
      return disk;
    } catch (err) {
      // A parent the caller gave stays the caller's.
      if (disk && opts.parent && disk.parent === opts.parent) disk.parent = undefined;
      if (disk) await disk.closeFiles().catch(() => undefined);
      else await base.close().catch(() => undefined);
      throw err;
    }
  }

  /** Parses every structure of one file; replays its log (in place when writable, in memory otherwise). */
  private static async decode(filePath: string, base: RandomAccessFile, writable: boolean): Promise<VhdxFile> {
    const warnings: string[] = [];
    // The identifier and both headers (the region tables are read after the log is replayed): not the whole
    // 1 MiB section, which every open of a large host's many disks would allocate and read.
    const section = Buffer.alloc(Math.max(HEADER_OFFSETS[1] + HEADER_SIZE, DETECT_HEAD_BYTES));
    await base.read(section, 0);
    if (section.toString('latin1', 0, 8) !== SIG_FILE) await refuseOtherFormats(filePath, base, section);
    const identifier = decodeFileIdentifier(section);
    if (base.size() < HEADER_SECTION_SIZE) {
      throw new VhdxCorruptError(
        'header section',
        0,
        `file is ${base.size()} bytes, shorter than the 1 MiB header section`,
        'VHDX_TRUNCATED',
      );
    }
    const headerSlots: [VhdxHeader | string, VhdxHeader | string] = [
      decodeHeader(section.subarray(HEADER_OFFSETS[0], HEADER_OFFSETS[0] + HEADER_SIZE), HEADER_OFFSETS[0]),
      decodeHeader(section.subarray(HEADER_OFFSETS[1], HEADER_OFFSETS[1] + HEADER_SIZE), HEADER_OFFSETS[1]),
    ];
    const picked = pickCurrentHeader(headerSlots[0], headerSlots[1]);
    if (!picked) {
      throw new VhdxCorruptError(
        'headers',
        HEADER_OFFSETS[0],
        `no valid header: header 1: ${headerSlots[0]}; header 2: ${headerSlots[1]}`,
      );
    }
    headerSlots.forEach((h, i) => {
      if (typeof h === 'string')
        warnings.push(`header ${i + 1} at offset ${HEADER_OFFSETS[i]} is invalid (${h}); the other copy is used`);
    });
    const header = picked.header;
    const hOff = HEADER_OFFSETS[picked.slot];
    if (header.version !== 1) {
      throw new VhdxCorruptError('header', hOff, `format version ${header.version} is not 1`, 'VHDX_UNSUPPORTED');
    }
    const hasLog = !isZeroGuid(header.logGuid);
    if (hasLog && header.logVersion !== 0) {
      throw new VhdxCorruptError('header', hOff, `log version ${header.logVersion} is not 0`, 'VHDX_UNSUPPORTED');
    }
    const logUsable =
      header.logOffset + header.logLength <= MAX_FILE_OFFSET &&
      header.logOffset >= HEADER_SECTION_SIZE &&
      header.logOffset % MiB === 0 &&
      header.logLength > 0 &&
      header.logLength % MiB === 0;
    if (hasLog && !logUsable) {
      throw new VhdxCorruptError(
        'header',
        hOff,
        `log at ${header.logOffset} (+${header.logLength}) is not 1 MiB aligned past the header section`,
      );
    }

    // Log replay comes before anything else is read: region tables and metadata go through the log.
    let file: RandomAccessFile = base;
    let replay: ReplayInfo | undefined;
    const headerState: HeaderState = { header, slot: picked.slot };
    let fileWriteGuidChanged = false;
    if (hasLog) {
      if (header.logLength > MAX_LOG_LENGTH) {
        throw new TidemarkError(
          'LIMIT_EXCEEDED',
          `log at ${header.logOffset} is ${header.logLength} bytes; logs over ${MAX_LOG_LENGTH} bytes are refused`,
        );
      }
      const log = Buffer.alloc(header.logLength);
      await base.read(log, header.logOffset);
      const ctx = { logOffset: header.logOffset, logLength: header.logLength, logGuid: header.logGuid };
      const plan = planReplay(log, ctx, base.size());
      if (writable) {
        // A new FileWriteGuid before the first modification, log playback included (MS-VHDX 2.2.2).
        await writeHeaders(base, headerState, { fileWriteGuid: newGuid() });
        fileWriteGuidChanged = true;
        const replayed = { solid: base.size(), sectors: new Set<number>() };
        for (const entry of plan.entries) await applyOps(base, entry.ops, replayed);
        if (base.size() < plan.lastFileOffset) await base.truncate(plan.lastFileOffset);
        await base.datasync();
        await writeHeaders(base, headerState, { logGuid: GUID_ZERO });
      } else {
        const patched = new PatchedFile(base);
        for (const entry of plan.entries) {
          for (const op of entry.ops)
            patched.patch(
              op.fileOffset,
              op.kind === 'data' ? LOG_SECTOR : op.length,
              op.kind === 'data' ? op.data : null,
            );
        }
        patched.extend(plan.lastFileOffset);
        file = patched;
      }
      replay = { entries: plan.entries.length, inMemory: !writable };
    }

    const tables = Buffer.alloc(2 * REGION_TABLE_SIZE);
    await file.read(tables, REGION_TABLE_OFFSETS[0]);
    const regionTables: [RegionTable | string, RegionTable | string] = [
      decodeRegionTable(tables.subarray(0, REGION_TABLE_SIZE)),
      decodeRegionTable(tables.subarray(REGION_TABLE_SIZE)),
    ];
    let regionTableInUse: 0 | 1 = 0;
    if (typeof regionTables[0] === 'string') {
      if (typeof regionTables[1] === 'string') {
        throw new VhdxCorruptError(
          'region tables',
          REGION_TABLE_OFFSETS[0],
          `no valid copy: table 1: ${regionTables[0]}; table 2: ${regionTables[1]}`,
        );
      }
      warnings.push(
        `region table 1 at offset ${REGION_TABLE_OFFSETS[0]} is invalid (${regionTables[0]}); the copy is used`,
      );
      regionTableInUse = 1;
    } else if (typeof regionTables[1] === 'string') {
      warnings.push(`region table 2 at offset ${REGION_TABLE_OFFSETS[1]} is invalid (${regionTables[1]})`);
    } else if (regionTables[0].checksum !== regionTables[1].checksum) {
      warnings.push('the two region table copies differ; table 1 is used');
    }
    const table = regionTables[regionTableInUse] as RegionTable;
    const { bat: batRegion, metadata: metadataRegion } = validateRegionTable(
      table,
      REGION_TABLE_OFFSETS[regionTableInUse],
    );
    if (logUsable) {
      for (const r of [batRegion, metadataRegion]) {
        if (r.fileOffset < header.logOffset + header.logLength && header.logOffset < r.fileOffset + r.length) {
          throw new VhdxCorruptError(
            'region table',
            REGION_TABLE_OFFSETS[regionTableInUse],
            `region at ${r.fileOffset} overlaps the log`,
          );
        }
      }
    }
    if (
      batRegion.fileOffset < metadataRegion.fileOffset + metadataRegion.length &&
      metadataRegion.fileOffset < batRegion.fileOffset + batRegion.length
    ) {
      throw new VhdxCorruptError(
        'region table',
        REGION_TABLE_OFFSETS[regionTableInUse],
        'the BAT and metadata regions overlap',
      );
    }

    // Metadata table and the known items.
    const mdWhere = metadataRegion.fileOffset;
    const mdTable = Buffer.alloc(METADATA_TABLE_SIZE);
    await file.read(mdTable, mdWhere);
    const metadataEntries = decodeMetadataTable(mdTable, mdWhere, metadataRegion.length);
    for (const e of metadataEntries) {
      if (e.isRequired && !isKnownItem(e)) {
        throw new VhdxCorruptError(
          'metadata table',
          mdWhere,
          `unknown required item ${guidToString(e.itemId)}`,
          'VHDX_UNSUPPORTED',
        );
      }
    }
    // The known items in one read when they lie within 1 MiB of each other (they sit side by side in every
    // file seen), else one read each: an open is on the path of every checkpoint, merge and snapshot.
    const known = metadataEntries.filter((m) => !m.isUser && isKnownItem(m) && m.length > 0);
    const spanStart = Math.min(...known.map((m) => m.offset));
    const spanEnd = Math.max(...known.map((m) => m.offset + m.length));
    let span: Buffer | undefined;
    if (known.length > 0 && spanEnd - spanStart <= MiB) {
      span = Buffer.alloc(spanEnd - spanStart);
      await file.read(span, mdWhere + spanStart);
    }
    const item = async (id: Guid, name: string, required: boolean): Promise<Buffer | undefined> => {
      const e = metadataEntries.find((m) => !m.isUser && guidEquals(m.itemId, id));
      if (!e) {
        if (required) throw new VhdxCorruptError('metadata table', mdWhere, `required item "${name}" is missing`);
        return undefined;
      }
      if (span && e.length > 0) return span.subarray(e.offset - spanStart, e.offset - spanStart + e.length);
      const b = Buffer.alloc(e.length);
      await file.read(b, mdWhere + e.offset);
      return b;
    };
    const params = decodeFileParameters((await item(ITEM_FILE_PARAMETERS, 'file parameters', true))!, mdWhere);
    const logicalSectorSize = decodeSectorSize(
      (await item(ITEM_LOGICAL_SECTOR_SIZE, 'logical sector size', true))!,
      'logical sector size item',
      mdWhere,
    );
    const physicalSectorSize = decodeSectorSize(
      (await item(ITEM_PHYSICAL_SECTOR_SIZE, 'physical sector size', true))!,
      'physical sector size item',
      mdWhere,
    );
    const virtualSize = decodeVirtualDiskSize(
      (await item(ITEM_VIRTUAL_DISK_SIZE, 'virtual disk size', true))!,
      logicalSectorSize,
      mdWhere,
    );
    const idItem = (await item(ITEM_VIRTUAL_DISK_ID, 'virtual disk id', true))!;
    if (idItem.length < 16)
      throw new VhdxCorruptError('virtual disk id item', mdWhere, `length ${idItem.length} is less than 16`);
    const virtualDiskId = Buffer.from(idItem.subarray(0, 16));
    let parentLocator: ParentLocator | undefined;
    const locItem = await item(ITEM_PARENT_LOCATOR, 'parent locator', params.hasParent);
    if (locItem) parentLocator = decodeParentLocator(locItem, mdWhere);
    if (params.hasParent) {
      if (!isVhdxLocator(parentLocator!)) {
        throw new VhdxCorruptError(
          'parent locator item',
          mdWhere,
          `locator type ${guidToString(parentLocator!.locatorType)} is not the VHDX type`,
          'VHDX_UNSUPPORTED',
        );
      }
      if (!parseLinkage(locatorGet(parentLocator!, 'parent_linkage'))) {
        throw new VhdxCorruptError('parent locator item', mdWhere, 'parent_linkage is missing or not a GUID');
      }
    }

    const geometry = computeGeometry(virtualSize, params.blockSize, logicalSectorSize, params.hasParent);
    if (batRegion.length < geometry.batEntries * 8) {
      throw new VhdxCorruptError(
        'BAT region',
        batRegion.fileOffset,
        `length ${batRegion.length} cannot hold the ${geometry.batEntries} entries the disk needs`,
      );
    }
    const disk = new VhdxFile({
      path: filePath,
      writable,
      file,
      identifier,
      headerSlots,
      headerState,
      regionTables,
      regionTableInUse,
      batRegion,
      metadataRegion,
      metadataEntries,
      params,
      virtualSize,
      virtualDiskId,
      logicalSectorSize,
      physicalSectorSize,
      parentLocator,
      replay,
      warnings,
      fileWriteGuidChanged,
    });
    await disk.scanPlacement();
    return disk;
  }

  /**
   * The parent locator's candidates (relative, volume, absolute path; then the child's directory) that resolve to
   * an existing file inside the allowed roots, in order; the others are recorded in `tried` with why.
   */
  private async *resolvedParentCandidates(
    opts: OpenOptions,
    roots: string[],
    tried: ParentLink['tried'],
  ): AsyncGenerator<{ c: ParentCandidate; path: string }> {
    for (const c of parentCandidates(this.path, this.parentLocator!, { allowedRoots: roots, pathMap: opts.pathMap })) {
      if (!c.hostPath) {
        tried.push({ key: c.key, value: c.value, outcome: 'no host mapping' });
        continue;
      }
      const r = await resolveInsideRoots(c.hostPath, roots);
      if ('problem' in r) {
        const outcome = r.problem === 'missing' ? 'not found' : 'outside the allowed directories';
        tried.push({ key: c.key, value: c.value, hostPath: c.hostPath, outcome });
        continue;
      }
      yield { c, path: r.path };
    }
  }

  /** Whether a DataWriteGuid is one the parent locator's linkage names; `expected` says which for messages. */
  private parentLinkage(): { matches: (dwg: Guid) => boolean; expected: string } {
    const loc = this.parentLocator!;
    const linkage = parseLinkage(locatorGet(loc, 'parent_linkage'))!;
    const linkage2 = parseLinkage(locatorGet(loc, 'parent_linkage2'));
    return {
      matches: (dwg) => guidEquals(dwg, linkage) || (linkage2 !== undefined && guidEquals(dwg, linkage2)),
      expected: `${formatLinkage(linkage)}${linkage2 ? ` or ${formatLinkage(linkage2)}` : ''}`,
    };
  }

  /** Finds, checks and opens the parent. */
  private async attachParent(opts: OpenOptions, roots: string[], depth: number): Promise<void> {
    const linkage = this.parentLinkage();
    const tried: ParentLink['tried'] = [];
    let mismatch: string | undefined;
    const seen = new Set<string>();
    for await (const { c, path: found } of this.resolvedParentCandidates(opts, roots, tried)) {
      if (seen.has(found)) continue;
      seen.add(found);
      if (found === this.path) {
        tried.push({ key: c.key, value: c.value, hostPath: found, outcome: 'names the disk itself' });
        continue;
      }
      let parent: VhdxFile;
      try {
        parent = await VhdxFile.openInChain(found, { ...opts, writable: false, parent: undefined }, roots, depth + 1);
      } catch (err) {
        // Not a readable file (a directory, a FIFO, a device): try the next candidate. A damaged VHDX, or
        // a parent another program holds (LOCKED), is reported.
        if (err instanceof FileTypeError) {
          tried.push({ key: c.key, value: c.value, hostPath: found, outcome: `a ${err.type}, not a disk file` });
          continue;
        }
        if (!(err instanceof TidemarkError) || (err.code !== 'IO_ERROR' && err.code !== 'NOT_FOUND')) throw err;
        tried.push({ key: c.key, value: c.value, hostPath: found, outcome: 'not a readable file' });
        continue;
      }
      const dwg = parent.header.dataWriteGuid;
      if (linkage.matches(dwg)) {
        if (parent.logicalSectorSize !== this.logicalSectorSize) {
          await parent.close();
          throw new VhdxCorruptError(
            'parent locator',
            undefined,
            `parent ${found} has ${parent.logicalSectorSize}-byte logical sectors, this disk ${this.logicalSectorSize}`,
            'PARENT_MISMATCH',
          );
        }
        tried.push({ key: c.key, value: c.value, hostPath: found, outcome: 'opened' });
        this.parent = parent;
        this.parentLink = { path: found, foundBy: c.key, tried };
        return;
      }
      await parent.close();
      mismatch = `${found} has DataWriteGuid ${formatLinkage(dwg)}, the locator expects ${linkage.expected} (the parent was modified after this disk was created)`;
      tried.push({ key: c.key, value: c.value, hostPath: found, outcome: 'DataWriteGuid does not match' });
    }
    if (mismatch) throw new TidemarkError('PARENT_MISMATCH', `parent of ${this.path}: ${mismatch}`, { tried });
    const list = tried
      .map(
        (t) =>
          `${t.key}=${JSON.stringify(t.value)}${t.hostPath ? ` -> ${JSON.stringify(t.hostPath)}` : ''} (${t.outcome})`,
      )
      .join('; ');
    if (tried.some((t) => t.outcome === 'outside the allowed directories')) {
      throw new TidemarkError(
        'PATH_NOT_ALLOWED',
        `parent of ${this.path} lies outside the allowed directories (${roots.join(', ')}): ${list}`,
        { tried },
      );
    }
    throw new TidemarkError('PARENT_NOT_FOUND', `parent of ${this.path} not found: ${list}`, { tried });
  }

  /**
   * Takes an open disk as the parent (see `OpenOptions.parent`): the locator must lead to its file, and it
   * must match as a parent opened from disk would (DataWriteGuid), with the same size and sector size.
   */
  private async adoptParent(given: VhdxFile, opts: OpenOptions, roots: string[]): Promise<void> {
    given.assertOpen();
    if (given.chain().length + 1 > MAX_CHAIN_DEPTH) {
      throw new VhdxCorruptError('parent locator', undefined, `chain deeper than ${MAX_CHAIN_DEPTH} disks`);
    }
    const linkage = this.parentLinkage();
    let givenReal: string;
    try {
      givenReal = await realpath(given.path);
    } catch {
      throw new TidemarkError('PARENT_NOT_FOUND', `parent of ${this.path}: ${given.path} no longer exists`);
    }
    const tried: ParentLink['tried'] = [];
    for await (const { c, path: found } of this.resolvedParentCandidates(opts, roots, tried)) {
      if (found !== givenReal) {
        tried.push({ key: c.key, value: c.value, hostPath: found, outcome: 'not the given parent' });
        continue;
      }
      const dwg = given.header.dataWriteGuid;
      if (!linkage.matches(dwg)) {
        throw new TidemarkError(
          'PARENT_MISMATCH',
          `parent of ${this.path}: ${given.path} has DataWriteGuid ${formatLinkage(dwg)}, the locator expects ${linkage.expected}`,
        );
      }
      if (given.logicalSectorSize !== this.logicalSectorSize || given.virtualSize !== this.virtualSize) {
        throw new VhdxCorruptError(
          'parent locator',
          undefined,
          `parent ${given.path} (${given.virtualSize} bytes, ${given.logicalSectorSize}-byte sectors) does not match this disk (${this.virtualSize} bytes, ${this.logicalSectorSize}-byte sectors)`,
          'PARENT_MISMATCH',
        );
      }
      tried.push({ key: c.key, value: c.value, hostPath: found, outcome: 'opened' });
      this.parent = given;
      this.parentLink = { path: found, foundBy: c.key, tried };
      return;
    }
    const list = tried.map((t) => `${t.key}=${JSON.stringify(t.value)} (${t.outcome})`).join('; ');
    const message = `parent of ${this.path}: no locator entry leads to ${given.path}: ${list}`;
    throw new TidemarkError('PARENT_NOT_FOUND', message, { tried });
  }

  /**
   * MS-VHDX 2.6.2.6.3: after a chain opens, stale path entries are updated to the parent actually
   * found (a chain moved together keeps working; a parent found by its name gets its paths written).
   */
  private async refreshParentPaths(): Promise<void> {
    const loc = this.parentLocator!;
    const parentPath = this.parent!.path;
    const rel = relativeLocatorPath(this.path, parentPath);
    const abs = absoluteLocatorPath(parentPath);
    const oldAbs = locatorGet(loc, 'absolute_win32_path');
    // A Windows absolute path that maps elsewhere is kept: it may be right on the host that wrote it.
    const absStale = oldAbs === undefined || /^\\\\\?\\Z:/i.test(oldAbs);
    if (locatorGet(loc, 'relative_path') === rel && (!absStale || oldAbs === abs)) return;
    let next = locatorSet(loc, 'relative_path', rel);
    if (absStale) next = locatorSet(next, 'absolute_win32_path', abs);
    await this.setParentLocator(next);
  }

  /** The header section, the log (when the header describes a usable one) and every region in use. */
  private structureSpans(): Span[] {
    const h = this.header;
    const logUsable =
      h.logLength > 0 &&
      h.logOffset >= HEADER_SECTION_SIZE &&
      h.logOffset % MiB === 0 &&
      h.logLength % MiB === 0 &&
      h.logOffset + h.logLength <= MAX_FILE_OFFSET;
    const table = this.regionTables[this.regionTableInUse] as RegionTable;
    return structureSpans(logUsable ? { offset: h.logOffset, length: h.logLength } : undefined, table.entries);
  }

  /**
   * Checks every allocated BAT entry against every structure, the end of the file and every other entry
   * (placement.ts), and sets where new blocks go: past every structure and every allocated block. Damage
   * keeps the file from being written (see `damageError`); a warning says so.
   */
  private async scanPlacement(): Promise<Placement> {
    const placement = await this.placementPass(this.file.size(), { keepOccupied: this.canWrite });
    this.placementScan = placement;
    this.fileEnd = this.endPast(placement, placement.presentEnd);
    this.warnings.splice(0, this.warnings.length, ...this.warnings.filter((w) => !w.startsWith('damaged:')));
    if (!placement.clean) this.warnings.push(`damaged: ${this.damageSummary(placement)}`);
    return placement;
  }

  /** One scan of the BAT against the file's structures, judged against `fileSize`. */
  private placementPass(fileSize: number, opts: ScanOptions): Promise<Placement> {
    const source = {
      geometry: this.geometry,
      fileSize,
      spans: this.structureSpans(),
      readBat: (dst: Buffer, first: number) => this.readBatRaw(dst, first),
    };
    return Placement.scan(source, opts);
  }

  /** Where new blocks may go: past the file, every structure and `entriesEnd` (1 MiB aligned). */
  private endPast(p: Placement, entriesEnd: number): number {
    const spanEnd = p.spans.reduce((m, x) => Math.max(m, Math.min(x.end, MAX_FILE_OFFSET)), 0);
    return Math.max(Math.ceil(p.fileSize / MiB) * MiB, spanEnd, Math.ceil(entriesEnd / MiB) * MiB);
  }

  /** One line on what keeps the file from being written. */
  private damageSummary(p: Placement): string {
    const parts: string[] = p.structureProblems.map((x) => x.message);
    if (p.damagedCount > 0) {
      const first = p.listed[0];
      const one = `${describeEntry(first.entry)} (BAT entry ${first.entry.index}) at file offset ${first.entry.offset} ${describeProblems(first, p.fileSize)}`;
      parts.push(
        p.damagedCount === 1
          ? `1 BAT entry is damaged: ${one}`
          : `${p.damagedCount} BAT entries are damaged, the first: ${one}`,
      );
    }
    if (p.truncated.entries > 0) {
      const past = p.listed.filter((d) => d.problems.some((x) => x.kind === 'eof')).map((d) => describeEntry(d.entry));
      const named =
        past.slice(0, 5).join(', ') + (p.truncated.entries > 5 ? ` and ${p.truncated.entries - 5} more` : '');
      parts.push(
        `the file is truncated: ${named} lie${p.truncated.entries === 1 ? 's' : ''} past its end, its BAT references data up to ${p.truncated.end} (${p.truncated.end - p.fileSize} bytes missing)`,
      );
    }
    // A BAT cut short is repairable (check --repair extends the file); structures beyond the limit are not.
    const repairable = p.structureProblems.every((x) => x.code === 'VHDX_TRUNCATED');
    return `${parts.join('; ')}; ${repairable ? 'the file can only be read until `tidemark vhdx check --repair` repairs it' : 'the file can only be read (`tidemark vhdx check --repair` cannot repair this)'}`;
  }

  /** The error every write of a damaged file gets (VHDX_TRUNCATED when truncation is all that is wrong). */
  private damageError(): TidemarkError {
    const p = this.placementScan;
    const onlyTruncated =
      p.structureProblems.every((x) => x.code === 'VHDX_TRUNCATED') &&
      p.listed.every((d) => d.problems.every((x) => x.kind === 'eof'));
    return new TidemarkError(
      onlyTruncated ? 'VHDX_TRUNCATED' : 'VHDX_CORRUPT',
      `${this.path} is open read-only: ${this.damageSummary(p)}`,
      { path: this.path, damagedEntries: p.damagedCount },
    );
  }

  /** What the open-time scan found (`clean` when nothing keeps the file from being written). */
  get placement(): Placement {
    return this.placementScan;
  }

  // ---------------------------------------------------------------- properties

  get header(): VhdxHeader {
    return this.headerState.header;
  }

  /** Open for writing (false from the start, once retired into a parent, or when the open found damage). */
  get writable(): boolean {
    return this.canWrite && this.placementScan.clean;
  }

  get currentHeaderSlot(): 0 | 1 {
    return this.headerState.slot;
  }

  get diskType(): DiskType {
    if (this.params.hasParent) return 'differencing';
    return this.params.leaveBlockAllocated ? 'fixed' : 'dynamic';
  }

  get blockSize(): number {
    return this.params.blockSize;
  }

  get fileSize(): number {
    return this.file.size();
  }

  /** Whether the open parent's DataWriteGuid is still one the parent locator accepts (the chain holds). */
  linksToParent(): boolean {
    if (!this.parent || !this.parentLocator) return false;
    const dwg = this.parent.header.dataWriteGuid;
    const linkage = parseLinkage(locatorGet(this.parentLocator, 'parent_linkage'));
    const linkage2 = parseLinkage(locatorGet(this.parentLocator, 'parent_linkage2'));
    return (!!linkage && guidEquals(dwg, linkage)) || (!!linkage2 && guidEquals(dwg, linkage2));
  }

  /** The chain from this disk to its base. */
  chain(): VhdxFile[] {
    return [this, ...(this.parent?.chain() ?? [])];
  }

  // ---------------------------------------------------------------- BAT and bitmaps

  private batSectorOf(index: number): { sector: number; at: number } {
    const off = this.batRegion.fileOffset + index * 8;
    return { sector: off - (off % LOG_SECTOR), at: off % LOG_SECTOR };
  }

  async batEntry(index: number): Promise<BatEntry> {
    const end = this.batRegion.fileOffset + index * 8 + 8;
    if (end > this.file.size()) {
      // A BAT cut short by a truncation: the entry is lost, not NOT_PRESENT.
      throw new VhdxCorruptError(
        'BAT',
        end - 8,
        `entry ${index} lies past the end of the file (${this.file.size()} bytes): truncated; \`tidemark vhdx check\` says what is lost`,
        'VHDX_TRUNCATED',
      );
    }
    const { sector, at } = this.batSectorOf(index);
    const buf =
      this.cache.peek(sector) ?? (await this.cache.load(sector, this.batRegion.fileOffset, this.batInUseEnd()));
    return decodeBatEntry(buf.readUInt32LE(at), buf.readUInt32LE(at + 4));
  }

  /**
   * Where the BAT's entries end, sector aligned: the region is often far larger than the disk needs (1 MiB for
   * a 4 MiB disk), and a cache miss reads at most up to here.
   */
  private batInUseEnd(): number {
    const used = Math.ceil((this.geometry.batEntries * 8) / LOG_SECTOR) * LOG_SECTOR;
    return this.batRegion.fileOffset + Math.min(this.batRegion.length, used);
  }

  payloadEntry(block: number): Promise<BatEntry> {
    return this.batEntry(payloadBatIndex(this.geometry, block));
  }

  /**
   * BAT entries [first, first + dst.length / 8) as they stand (changes not yet committed included), 8 bytes
   * each: for passes over the whole BAT, which read it in large pieces instead of entry by entry.
   */
  async readBatRaw(dst: Buffer, first: number): Promise<void> {
    const start = this.batRegion.fileOffset + first * 8;
    await this.file.read(dst, start);
    if (this.cache.dirtyCount === 0) return;
    const end = start + dst.length;
    for (let sec = start - (start % LOG_SECTOR); sec < end; sec += LOG_SECTOR) {
      const cached = this.cache.peek(sec);
      if (!cached) continue;
      const from = Math.max(sec, start);
      const to = Math.min(sec + LOG_SECTOR, end);
      cached.copy(dst, from - start, from - sec, to - sec);
    }
  }

  private async setBatEntry(index: number, state: number, offset: number): Promise<void> {
    const g = this.geometry;
    const chunk = Math.floor(index / (g.chunkRatio + 1));
    const pos = index - chunk * (g.chunkRatio + 1);
    const bitmap = pos === g.chunkRatio;
    if (
      (state === BlockState.FullyPresent || state === BlockState.PartiallyPresent) &&
      (!bitmap || this.params.hasParent)
    ) {
      // Never place a block the engine uses where a structure or another block is (new space and checked
      // reuse only). The extent is the one the open-time scan judged (a short last block: its part in the disk).
      const block = chunk * g.chunkRatio + pos;
      const extent = bitmap ? MiB : block < g.dataBlocks ? this.blockExtent(block) : this.blockSize;
      const problem = this.placementScan.problemAt(offset, extent);
      if (problem) {
        throw new VhdxCorruptError(
          'BAT entry',
          this.batRegion.fileOffset + index * 8,
          `refusing to place an entry at file offset ${offset}: it ${problem}`,
        );
      }
    }
    this.fresh.delete(index); // whoever places a fresh block notes it again afterwards
    const { sector, at } = this.batSectorOf(index);
    const buf = await this.cache.load(sector, this.batRegion.fileOffset, this.batInUseEnd());
    const [lo, hi] = encodeBatEntry(state, offset);
    buf.writeUInt32LE(lo, at);
    buf.writeUInt32LE(hi, at + 4);
    this.cache.markDirty(sector);
    this.batChanged.add(index);
  }

  /** The file offset of the sector bitmap block of `block`'s chunk; throws when it should exist and doesn't. */
  private async bitmapBlockOffset(block: number): Promise<number | undefined> {
    const chunk = Math.floor(block / this.geometry.chunkRatio);
    const e = await this.batEntry(bitmapBatIndex(this.geometry, chunk));
    if (e.state !== SB_PRESENT) return undefined;
    const index = bitmapBatIndex(this.geometry, chunk);
    const problem = this.placementScan.problemAt(e.offset, MiB);
    if (problem) {
      throw new VhdxCorruptError(
        'BAT entry',
        this.batRegion.fileOffset + index * 8,
        `the sector bitmap of chunk ${chunk} at file offset ${e.offset} ${problem}: its blocks cannot be used; run \`tidemark vhdx check --repair\``,
      );
    }
    if (e.offset + MiB > this.file.size()) {
      throw new VhdxCorruptError(
        'BAT entry',
        this.batRegion.fileOffset + index * 8,
        `the sector bitmap of chunk ${chunk} at file offset ${e.offset} extends past the end of the file (${this.file.size()} bytes): truncated`,
        'VHDX_TRUNCATED',
      );
    }
    return e.offset;
  }

  /** Visits runs of sectors [s0, s1) of `block` with equal bitmap bits. */
  private async bitmapRuns(
    block: number,
    s0: number,
    s1: number,
    visit: (from: number, to: number, present: boolean) => Promise<void>,
  ): Promise<void> {
    const bm = await this.bitmapBlockOffset(block);
    if (bm === undefined) {
      throw new VhdxCorruptError(
        'BAT',
        this.batRegion.fileOffset,
        `block ${block} is partially present but its sector bitmap block is not present`,
      );
    }
    const base = (block % this.geometry.chunkRatio) * this.geometry.sectorsPerBlock;
    let runStart = s0;
    let runValue: boolean | undefined;
    let sectorBuf: Buffer | undefined;
    let sectorAt = -1;
    for (let s = s0; s < s1; s++) {
      const bit = base + s;
      const byteOff = bm + (bit >> 3);
      const sec = byteOff - (byteOff % LOG_SECTOR);
      if (sec !== sectorAt) {
        sectorBuf = this.cache.peek(sec) ?? (await this.cache.load(sec, bm, bm + MiB));
        sectorAt = sec;
      }
      const v = ((sectorBuf![byteOff - sec] >> (bit & 7)) & 1) === 1;
      if (runValue === undefined) runValue = v;
      else if (v !== runValue) {
        await visit(runStart, s, runValue);
        runStart = s;
        runValue = v;
      }
    }
    if (runValue !== undefined) await visit(runStart, s1, runValue);
  }

  private async setBitmapBits(bm: number, block: number, s0: number, s1: number, value: boolean): Promise<void> {
    const base = (block % this.geometry.chunkRatio) * this.geometry.sectorsPerBlock;
    for (let s = s0; s < s1;) {
      const bit = base + s;
      const byteOff = bm + (bit >> 3);
      const sec = byteOff - (byteOff % LOG_SECTOR);
      const buf = await this.cache.load(sec, bm, bm + MiB);
      // Whole bytes at a time where possible.
      const sectorBitEnd = (sec - bm + LOG_SECTOR) * 8 - base;
      const stop = Math.min(s1, sectorBitEnd);
      for (; s < stop; s++) {
        const b = base + s;
        const i = bm + (b >> 3) - sec;
        if ((b & 7) === 0 && s + 8 <= stop) {
          buf[i] = value ? 0xff : 0;
          s += 7;
          continue;
        }
        if (value) buf[i] |= 1 << (b & 7);
        else buf[i] &= ~(1 << (b & 7));
      }
      this.cache.markDirty(sec);
    }
  }

  // ---------------------------------------------------------------- reads

  private assertOpen(): void {
    if (this.closed) throw new TidemarkError('CLOSED', `${this.path} is closed`);
  }

  private assertRange(offset: number, length: number): void {
    checkRange(offset, length, this.virtualSize, 'virtual disk');
  }

  /** Reads `dst.length` bytes of the virtual disk at `offset`. */
  async read(dst: Uint8Array, offset: number): Promise<void> {
    this.assertOpen();
    this.assertRange(offset, dst.length);
    await this.lock.shared(() => this.readVirtual(dst, offset));
  }

  async readAt(offset: number, length: number): Promise<Buffer> {
    if (length > MAX_ALLOCATION)
      throw new TidemarkError('LIMIT_EXCEEDED', `a single read is limited to ${MAX_ALLOCATION} bytes`);
    const buf = Buffer.alloc(length);
    await this.read(buf, offset);
    return buf;
  }

  private async readVirtual(dst: Uint8Array, offset: number): Promise<void> {
    const bs = this.blockSize;
    for (let pos = 0; pos < dst.length;) {
      const v = offset + pos;
      const block = Math.floor(v / bs);
      const inBlock = v - block * bs;
      const n = Math.min(bs - inBlock, dst.length - pos);
      await this.readBlock(block, inBlock, dst.subarray(pos, pos + n));
      pos += n;
    }
  }

  private async readBlock(block: number, inBlock: number, dst: Uint8Array): Promise<void> {
    const e = await this.payloadEntry(block);
    switch (e.state) {
      case BlockState.FullyPresent:
        return this.readPayload(block, e.offset, inBlock, dst);
      case BlockState.PartiallyPresent: {
        if (!this.params.hasParent) {
          throw new VhdxCorruptError(
            'BAT',
            this.batRegion.fileOffset,
            `block ${block} is partially present in a disk without a parent`,
          );
        }
        const lss = this.logicalSectorSize;
        const s0 = Math.floor(inBlock / lss);
        const s1 = Math.ceil((inBlock + dst.length) / lss);
        await this.bitmapRuns(block, s0, s1, async (from, to, present) => {
          const a = Math.max(inBlock, from * lss);
          const b = Math.min(inBlock + dst.length, to * lss);
          const part = dst.subarray(a - inBlock, b - inBlock);
          if (present) await this.readPayload(block, e.offset, a, part);
          else await this.readParent(block * this.blockSize + a, part);
        });
        return;
      }
      case BlockState.NotPresent:
        if (this.params.hasParent) return this.readParent(block * this.blockSize + inBlock, dst);
        dst.fill(0);
        return;
      case BlockState.Zero:
      case BlockState.Unmapped:
      case BlockState.Undefined:
        dst.fill(0);
        return;
      default:
        throw new VhdxCorruptError(
          'BAT',
          this.batRegion.fileOffset + payloadBatIndex(this.geometry, block) * 8,
          `block ${block} has unknown state ${e.state}`,
        );
    }
  }

  /**
   * Reads from a present block. A block whose space overlaps a structure or another block fails whole (its
   * bytes are not its own); one cut short by a truncation fails for the bytes that are missing.
   */
  private async readPayload(block: number, blockOffset: number, inBlock: number, dst: Uint8Array): Promise<void> {
    this.checkPlacement(block, blockOffset);
    const at = blockOffset + inBlock;
    if (at + dst.length > this.file.size()) {
      throw new VhdxCorruptError(
        'BAT entry',
        this.batRegion.fileOffset + payloadBatIndex(this.geometry, block) * 8,
        `block ${block} at file offset ${blockOffset} extends past the end of the file (${this.file.size()} bytes): truncated; \`tidemark vhdx check\` lists what is lost`,
        'VHDX_TRUNCATED',
      );
    }
    await this.file.read(dst, at);
  }

  /** Throws VHDX_CORRUPT naming the block and what it overlaps when its space is not its own. */
  private checkPlacement(block: number, offset: number): void {
    const problem = this.placementScan.problemAt(offset, this.blockExtent(block));
    if (!problem) return;
    throw new VhdxCorruptError(
      'BAT entry',
      this.batRegion.fileOffset + payloadBatIndex(this.geometry, block) * 8,
      `block ${block} at file offset ${offset} ${problem}: its data cannot be used; run \`tidemark vhdx check --repair\``,
    );
  }

  private async readParent(offset: number, dst: Uint8Array): Promise<void> {
    const p = this.parent;
    if (!p)
      throw new TidemarkError('PARENT_NOT_FOUND', `${this.path} is a differencing disk opened without its parent`);
    const inside = Math.max(0, Math.min(dst.length, p.virtualSize - offset));
    if (inside > 0) await p.readVirtual(dst.subarray(0, inside), offset);
    if (inside < dst.length) dst.fill(0, inside);
  }

  /**
   * Ranges of [offset, offset+length) that any disk of the chain may hold data for (block granularity);
   * everything else reads as zeros. Convert and full backups read only these.
   */
  async allocatedExtents(offset = 0, length = this.virtualSize - offset): Promise<Extent[]> {
    this.assertOpen();
    this.assertRange(offset, length);
    const out: ContentExtent[] = [];
    await this.lock.shared(() => this.collectAllocated(offset, length, out, false));
    return out.map(({ offset: o, length: l }) => ({ offset: o, length: l }));
  }

  /**
   * allocatedExtents with the ranges certain to read zeros marked `zero`: the parts of fully present
   * blocks that are holes of the host file (blocks written in part, or zeroed while fresh), found with
   * SEEK_DATA where the file can tell. What NBD block status and the backup reader skip.
   */
  async contentExtents(offset = 0, length = this.virtualSize - offset): Promise<ContentExtent[]> {
    this.assertOpen();
    this.assertRange(offset, length);
    const out: ContentExtent[] = [];
    await this.lock.shared(() => this.collectAllocated(offset, length, out, true));
    return out;
  }

  private async collectAllocated(offset: number, length: number, out: ContentExtent[], refine: boolean): Promise<void> {
    const bs = this.blockSize;
    const push = (o: number, l: number, zero: boolean) => {
      if (l <= 0) return;
      const last = out[out.length - 1];
      if (last && last.offset + last.length === o && last.zero === zero) last.length += l;
      else out.push({ offset: o, length: l, zero });
    };
    for (let pos = offset; pos < offset + length;) {
      const block = Math.floor(pos / bs);
      const n = Math.min((block + 1) * bs, offset + length) - pos;
      const e = await this.payloadEntry(block);
      // A block reaching past the end of the file is a damage its reads report: no refining there.
      const inFile = e.offset >= HEADER_SECTION_SIZE && e.offset + this.blockExtent(block) <= this.file.size();
      if (e.state === BlockState.FullyPresent && refine && inFile && this.file.dataExtents) {
        const fileAt = e.offset + (pos - block * bs);
        const data = this.file.dataExtents(fileAt, n);
        if (!data) push(pos, n, false);
        else {
          let at = fileAt;
          for (const d of data) {
            const from = Math.max(d.offset, at);
            const to = Math.min(d.offset + d.length, fileAt + n);
            if (to <= from) continue;
            push(pos + (at - fileAt), from - at, true);
            push(pos + (from - fileAt), to - from, false);
            at = to;
          }
          push(pos + (at - fileAt), fileAt + n - at, true);
        }
      } else if (e.state === BlockState.FullyPresent || e.state === BlockState.PartiallyPresent) push(pos, n, false);
      else if (e.state === BlockState.NotPresent && this.parent) {
        const inside = Math.max(0, Math.min(n, this.parent.virtualSize - pos));
        if (inside > 0) {
          const sub: ContentExtent[] = [];
          await this.parent.collectAllocated(pos, inside, sub, refine);
          for (const x of sub) push(x.offset, x.length, x.zero);
        }
      }
      pos += n;
    }
  }

  /** What this file itself defines, block by block (not its parent): for merge and info. */
  async *ownBlocks(): AsyncGenerator<{ block: number; entry: BatEntry }> {
    for (let block = 0; block < this.geometry.dataBlocks; block++) {
      yield { block, entry: await this.payloadEntry(block) };
    }
  }

  /** Sector runs of a partially present block that this file holds (block-relative byte ranges). */
  async presentRuns(block: number): Promise<Extent[]> {
    const out: Extent[] = [];
    const lss = this.logicalSectorSize;
    const sectors = Math.min(
      this.geometry.sectorsPerBlock,
      Math.ceil((this.virtualSize - block * this.blockSize) / lss),
    );
    await this.bitmapRuns(block, 0, sectors, async (from, to, present) => {
      if (present) out.push({ offset: from * lss, length: (to - from) * lss });
    });
    return out;
  }

  /** The raw bytes of a metadata item (the table entry says where). */
  async readMetadataItem(e: MetadataEntry): Promise<Buffer> {
    const data = Buffer.alloc(e.length);
    if (e.length > 0) await this.file.read(data, this.metadataRegion.fileOffset + e.offset);
    return data;
  }

  /** Reads bytes this file holds for a block, without consulting the parent. */
  async readOwn(block: number, inBlock: number, dst: Uint8Array): Promise<void> {
    const e = await this.payloadEntry(block);
    if (e.state !== BlockState.FullyPresent && e.state !== BlockState.PartiallyPresent) {
      throw new TidemarkError('INVALID_ARGUMENT', `block ${block} holds no data in ${this.path}`);
    }
    await this.readPayload(block, e.offset, inBlock, dst);
  }

  // ---------------------------------------------------------------- writes

  private assertWritable(): void {
    this.assertOpen();
    if (!this.canWrite) throw new TidemarkError('READ_ONLY', `${this.path} is open read-only`);
    if (!this.placementScan.clean) throw this.damageError();
  }

  /** Throws what a write would throw now (READ_ONLY, CLOSED, or the damage the open found): callers fail early. */
  checkWritable(): void {
    this.assertWritable();
  }

  /**
   * Why the headers on disk are not the ones this instance last read or wrote (another program wrote the
   * file: QEMU's tools and Windows install new write GUIDs and sequence numbers), or undefined. The caller
   * holds off our own header writes (`flushAndHold`), or uses `verifyHeadersOnDisk`.
   */
  async headersOnDiskDiffer(): Promise<string | undefined> {
    return (await this.compareHeadersOnDisk()).why;
  }

  /** The current header on disk (undefined when neither slot is valid) and why it is not ours, if it is not. */
  private async compareHeadersOnDisk(): Promise<{ why?: string; theirs?: { header: VhdxHeader; slot: 0 | 1 } }> {
    this.assertOpen();
    const slots = Buffer.alloc(2 * HEADER_SIZE);
    await this.file.read(slots.subarray(0, HEADER_SIZE), HEADER_OFFSETS[0]);
    await this.file.read(slots.subarray(HEADER_SIZE), HEADER_OFFSETS[1]);
    const picked = pickCurrentHeader(
      decodeHeader(slots.subarray(0, HEADER_SIZE), HEADER_OFFSETS[0]),
      decodeHeader(slots.subarray(HEADER_SIZE), HEADER_OFFSETS[1]),
    );
    const name = path.basename(this.path);
    if (!picked) return { why: `the headers of ${name} on disk are no longer valid` };
    // Another instance in this process may have written the file since (a merge writes a parent that a
    // chain holds open read-only), or be writing it now (a header update writes two slots in turn, and a
    // flush that cleans the log may run beside the caller): any of the headers this process wrote last
    // may be the current one.
    const theirs = picked.header;
    const ours = [this.headerState.header, ...(headersWritten.get(this.path) ?? [])];
    const same = (h: VhdxHeader) =>
      h.sequenceNumber === theirs.sequenceNumber &&
      guidEquals(h.fileWriteGuid, theirs.fileWriteGuid) &&
      guidEquals(h.dataWriteGuid, theirs.dataWriteGuid) &&
      guidEquals(h.logGuid, theirs.logGuid);
    if (ours.some(same)) return {};
    const last = ours.reduce((a, b) => (b.sequenceNumber > a.sequenceNumber ? b : a));
    if (theirs.sequenceNumber !== last.sequenceNumber) {
      return {
        why: `another program rewrote the headers of ${name} (sequence number ${last.sequenceNumber} → ${theirs.sequenceNumber})`,
        theirs: picked,
      };
    }
    const k = (['fileWriteGuid', 'dataWriteGuid', 'logGuid'] as const).find((f) => !guidEquals(theirs[f], last[f]))!;
    return {
      why: `another program rewrote the headers of ${name} (${k} ${guidToString(last[k])} → ${guidToString(theirs[k])})`,
      theirs: picked,
    };
  }

  /**
   * Takes the headers on disk as this instance's own when a writer that ignores image locks (`qemu-io -U`)
   * rewrote them while the file was open here, so that what this instance writes next (a checkpoint's
   * child links to the DataWriteGuid) matches the file, not headers it no longer has. What is pending is
   * laid over what the other writer left and committed under the adopted headers; then the file's size,
   * the BAT and every cached sector are read again, so new blocks go past the other writer's. `beforeAdopt` runs first with the reason (a tracker starts a new epoch:
   * it cannot vouch for what the other writer did). Returns the reason, or undefined when the headers are
   * ours. Refuses, changing nothing, a file whose headers are no longer valid, whose other writer's log is
   * live (it is still writing, or crashed), or whose layout (region table, virtual size) it changed.
   */
  async adoptHeadersOnDisk(beforeAdopt?: (why: string) => Promise<void>): Promise<string | undefined> {
    this.assertWritable();
    return this.lock.exclusive(async () => {
      const { why, theirs } = await this.compareHeadersOnDisk();
      if (!why) return undefined;
      const stop = 'stop the VM or close the file, and let it be checked before it is written again';
      if (!theirs) throw new TidemarkError('CONFLICT', `${why}: ${stop}`);
      if (!isZeroGuid(theirs.header.logGuid))
        throw new TidemarkError('CONFLICT', `${why}, and its log is active (it is still writing, or crashed): ${stop}`);
      const changed = await this.layoutChangedOnDisk();
      if (changed) throw new TidemarkError('CONFLICT', `${why}, and changed its ${changed}: ${stop}`);
      await beforeAdopt?.(why);
      this.headerState.header = theirs.header;
      this.headerState.slot = theirs.slot;
      this.logWriter = undefined;
      this.fileWriteGuidChanged = false;
      this.dataWriteGuidChanged = false;
      this.nextDataWriteGuid = undefined;
      await this.file.refreshSize?.();
      this.fileEnd = Math.max(this.fileEnd, Math.ceil(this.file.size() / MiB) * MiB);
      this.fresh.clear();
      if (this.cache.dirtyCount > 0) {
        // Ours not yet committed are laid over what the other writer left, so neither loses its own:
        // the BAT entries we set, the sector bitmap bits we set (both only ever set bits).
        await this.mergeDirtyWithDisk();
        await this.beginChange(false);
        await this.cleanLog(await this.commit());
      }
      this.cache = new MetaCache(this.file);
      await this.scanPlacement();
      this.warnings.push(`adopted headers another program wrote: ${why}`);
      return why;
    });
  }

  /** Each dirty cached sector re-read from the file, with this instance's own changes laid over it. */
  private async mergeDirtyWithDisk(): Promise<void> {
    const bat = this.batRegion;
    const md = this.metadataRegion;
    for (const sector of this.cache.dirtyOffsets()) {
      const ours = this.cache.peek(sector)!;
      if (sector >= md.fileOffset && sector < md.fileOffset + md.length) continue; // ours: a locator update
      const onDisk = Buffer.alloc(ours.length);
      await this.file.read(onDisk, sector);
      if (sector >= bat.fileOffset && sector < bat.fileOffset + bat.length) {
        const first = (sector - bat.fileOffset) / 8;
        for (const index of this.batChanged) {
          const at = (index - first) * 8;
          if (at >= 0 && at < ours.length) ours.copy(onDisk, at, at, at + 8);
        }
      } else {
        for (let i = 0; i < ours.length; i++) onDisk[i] |= ours[i];
      }
      onDisk.copy(ours);
    }
  }

  /** What of the file's layout differs on disk from what this instance uses (region table, metadata), or undefined. */
  private async layoutChangedOnDisk(): Promise<string | undefined> {
    const table = Buffer.alloc(REGION_TABLE_SIZE);
    await this.file.read(table, REGION_TABLE_OFFSETS[this.regionTableInUse]);
    const decoded = decodeRegionTable(table);
    const ours = this.regionTables[this.regionTableInUse] as RegionTable;
    if (typeof decoded === 'string' || decoded.checksum !== ours.checksum) return 'region table';
    const where = this.metadataRegion.fileOffset;
    const md = Buffer.alloc(METADATA_TABLE_SIZE);
    await this.file.read(md, where);
    let entries: MetadataEntry[];
    try {
      entries = decodeMetadataTable(md, where, this.metadataRegion.length);
    } catch {
      return 'metadata table';
    }
    const key = (e: MetadataEntry) => `${guidToString(e.itemId)}@${e.offset}+${e.length}`;
    if (entries.map(key).join() !== this.metadataEntries.map(key).join()) return 'metadata table';
    const sizeEntry = entries.find((e) => !e.isUser && guidEquals(e.itemId, ITEM_VIRTUAL_DISK_SIZE));
    if (sizeEntry) {
      const b = Buffer.alloc(8);
      await this.file.read(b, where + sizeEntry.offset);
      if (Number(b.readBigUInt64LE(0)) !== this.virtualSize) return 'virtual size';
    }
    return undefined;
  }

  /** `headersOnDiskDiffer` with our own metadata changes held off meanwhile. */
  verifyHeadersOnDisk(): Promise<string | undefined> {
    return this.lock.shared(() => this.headersOnDiskDiffer());
  }

  /** The DataWriteGuid the next guest-visible change installs (merge uses it; see parent_linkage2). */
  setNextDataWriteGuid(g: Guid): void {
    if (this.dataWriteGuidChanged)
      throw new TidemarkError('INVALID_ARGUMENT', 'DataWriteGuid already changed in this session');
    this.nextDataWriteGuid = g;
  }

  /** Header update before the first change of a session (MS-VHDX 2.2.2.1), then a log to write to. */
  private async beginChange(userVisible: boolean): Promise<void> {
    const changes: Partial<VhdxHeader> = {};
    if (!this.fileWriteGuidChanged) changes.fileWriteGuid = newGuid();
    if (!this.logWriter) {
      const h = this.header;
      if (
        h.logLength === 0 ||
        h.logOffset + h.logLength > MAX_FILE_OFFSET ||
        h.logOffset < HEADER_SECTION_SIZE ||
        h.logOffset % MiB !== 0 ||
        h.logLength % MiB !== 0
      ) {
        throw new TidemarkError(
          'VHDX_UNSUPPORTED',
          `${this.path} has no usable log (offset ${h.logOffset}, length ${h.logLength}); it cannot be modified`,
        );
      }
      changes.logGuid = newGuid();
      const writer = new LogWriter({ logOffset: h.logOffset, logLength: h.logLength, logGuid: changes.logGuid });
      // A header naming a log with no valid entry is a corrupt file (MS-VHDX 2.3.3): so an empty entry
      // for the new LogGuid is made durable first. The header still says "no log" (LogGuid zero) while
      // it is written, so no log that might need replaying is overwritten.
      const flushed = Math.floor(this.file.size() / MiB) * MiB;
      for (const w of writer.nextEntry([], flushed, Math.max(this.fileEnd, flushed)))
        await this.file.write(w.data, w.offset);
      await this.file.datasync();
      this.logWriter = writer;
    }
    if (userVisible && !this.dataWriteGuidChanged) changes.dataWriteGuid = this.nextDataWriteGuid ?? newGuid();
    if (Object.keys(changes).length === 0) return;
    await writeHeaders(this.file, this.headerState, changes);
    this.fileWriteGuidChanged = true;
    if (changes.dataWriteGuid) this.dataWriteGuidChanged = true;
  }

  /** New space past the file's end (scanFileEnd starts there): a hole, so it reads as zeros. */
  private async allocate(length: number): Promise<number> {
    const offset = this.fileEnd;
    this.fileEnd += Math.ceil(length / MiB) * MiB;
    await this.file.truncate(this.fileEnd);
    return offset;
  }

  /** True when [from, to) of the block at BAT `index` was never written since it was placed. */
  private isFresh(index: number, from: number, to: number): boolean {
    return this.fresh.get(index)?.gaps.some(([a, b]) => a <= from && to <= b) ?? false;
  }

  /** Records that [from, to) of the block at BAT `index` now holds written bytes. */
  private noteWritten(index: number, from: number, to: number): void {
    const f = this.fresh.get(index);
    if (!f) return;
    const gaps: [number, number][] = [];
    for (const [a, b] of f.gaps) {
      if (a < from) gaps.push([a, Math.min(b, from)]);
      if (b > to) gaps.push([Math.max(a, to), b]);
    }
    if (gaps.length === 0 || gaps.length > MAX_FRESH_GAPS) this.fresh.delete(index);
    else f.gaps = gaps;
  }

  /** Starts tracking a block just placed (in a hole past the old end of the file) with [from, to) written. */
  private noteAllocated(index: number, extent: number, from: number, to: number): void {
    if (this.fresh.size >= MAX_FRESH_BLOCKS) this.fresh.delete(this.fresh.keys().next().value!);
    this.fresh.set(index, { gaps: [[0, extent]] });
    this.noteWritten(index, from, to);
  }

  /** Writes `data` at virtual `offset`. Unaligned edges are completed from the current content. */
  async write(data: Uint8Array, offset: number): Promise<void> {
    this.assertWritable();
    this.assertRange(offset, data.length);
    if (data.length === 0) return;
    await this.lock.exclusive(async () => {
      const marking = this.observer?.beforeChange(offset, data.length);
      if (marking) await marking;
      await this.beginChange(true);
      const lss = this.logicalSectorSize;
      const start = Math.floor(offset / lss) * lss;
      const end = Math.ceil((offset + data.length) / lss) * lss;
      let buf = data;
      if (start !== offset || end !== offset + data.length) {
        const aligned = Buffer.alloc(end - start);
        await this.readVirtual(aligned.subarray(0, lss), start);
        if (end - lss > start) await this.readVirtual(aligned.subarray(aligned.length - lss), end - lss);
        aligned.set(data, offset - start);
        buf = aligned;
      }
      await this.forEachBlock(start, buf.length, (block, inBlock, pos, n) =>
        this.writeBlock(block, inBlock, buf.subarray(pos, pos + n)),
      );
    });
  }

  private async forEachBlock(
    offset: number,
    length: number,
    fn: (block: number, inBlock: number, pos: number, n: number) => Promise<void>,
  ): Promise<void> {
    const bs = this.blockSize;
    for (let pos = 0; pos < length;) {
      const v = offset + pos;
      const block = Math.floor(v / bs);
      const inBlock = v - block * bs;
      const n = Math.min(bs - inBlock, length - pos);
      await fn(block, inBlock, pos, n);
      pos += n;
    }
  }

  /** Bytes of `block` that lie inside the virtual disk. */
  private blockExtent(block: number): number {
    return Math.min(this.blockSize, this.virtualSize - block * this.blockSize);
  }

  /** Sector-aligned write inside one block. */
  private async writeBlock(block: number, inBlock: number, src: Uint8Array): Promise<void> {
    const e = await this.payloadEntry(block);
    const index = payloadBatIndex(this.geometry, block);
    const lss = this.logicalSectorSize;
    if (e.state === BlockState.FullyPresent) {
      this.checkPayloadOffset(block, e.offset);
      await this.file.write(src, e.offset + inBlock);
      this.noteWritten(index, inBlock, inBlock + src.length);
      return;
    }
    if (e.state === BlockState.PartiallyPresent) {
      this.checkPayloadOffset(block, e.offset);
      await this.file.write(src, e.offset + inBlock);
      const bm = await this.bitmapBlockOffset(block);
      if (bm === undefined) {
        throw new VhdxCorruptError(
          'BAT',
          this.batRegion.fileOffset,
          `block ${block} is partially present but its sector bitmap block is not present`,
        );
      }
      await this.setBitmapBits(bm, block, inBlock / lss, (inBlock + src.length) / lss, true);
      return;
    }
    if (![BlockState.NotPresent, BlockState.Zero, BlockState.Unmapped, BlockState.Undefined].includes(e.state)) {
      throw new VhdxCorruptError(
        'BAT',
        this.batRegion.fileOffset + index * 8,
        `block ${block} has unknown state ${e.state}`,
      );
    }
    const whole = inBlock === 0 && src.length >= this.blockExtent(block);
    const fromParent = this.params.hasParent && e.state === BlockState.NotPresent && !whole;
    // A fixed disk keeps its preallocated location; its old content must not show through. A stale
    // location is reused only when it lies in the file, clear of every structure and every allocated block.
    const reuse =
      this.params.leaveBlockAllocated &&
      !this.params.hasParent &&
      e.offset >= HEADER_SECTION_SIZE &&
      e.offset + this.blockSize <= this.fileEnd &&
      this.placementScan.claimIfFree(e.offset, this.blockSize);
    const offset = reuse ? e.offset : await this.allocate(this.blockSize);
    if (reuse && !whole) {
      for (const [from, to] of [
        [0, inBlock],
        [inBlock + src.length, this.blockExtent(block)],
      ]) {
        let at = from;
        for (const z of zeroPieces(to - from)) {
          await this.file.write(z, offset + at);
          at += z.length;
        }
      }
    }
    await this.file.write(src, offset + inBlock);
    if (fromParent) {
      // Only the written sectors come from this file; the rest still read from the parent.
      const bm = (await this.bitmapBlockOffset(block)) ?? (await this.allocateBitmapBlock(block));
      await this.setBitmapBits(bm, block, 0, this.geometry.sectorsPerBlock, false);
      await this.setBitmapBits(bm, block, inBlock / lss, (inBlock + src.length) / lss, true);
      await this.setBatEntry(index, BlockState.PartiallyPresent, offset);
    } else {
      await this.setBatEntry(index, BlockState.FullyPresent, offset);
      if (!reuse && !whole) this.noteAllocated(index, this.blockExtent(block), inBlock, inBlock + src.length);
    }
  }

  private async allocateBitmapBlock(block: number): Promise<number> {
    const chunk = Math.floor(block / this.geometry.chunkRatio);
    const offset = await this.allocate(MiB);
    await this.setBatEntry(bitmapBatIndex(this.geometry, chunk), SB_PRESENT, offset);
    return offset;
  }

  /**
   * Before data is written into a present block: its space must be its own (no structure, no other block:
   * what the open-time scan established, re-checked for entries placed since) and inside the file's extent.
   */
  private checkPayloadOffset(block: number, offset: number): void {
    this.checkPlacement(block, offset);
    if (offset + this.blockExtent(block) > this.fileEnd) {
      throw new VhdxCorruptError(
        'BAT entry',
        this.batRegion.fileOffset + payloadBatIndex(this.geometry, block) * 8,
        `block ${block} at file offset ${offset} lies past the end of the file (${this.fileEnd} bytes)`,
      );
    }
  }

  /** Makes [offset, offset+length) read as zeros; whole blocks are deallocated unless `noHole`. */
  async writeZeroes(offset: number, length: number, opts: { noHole?: boolean } = {}): Promise<void> {
    await this.zeroRange(offset, length, opts.noHole ? 'keep' : BlockState.Zero);
  }

  /** Unmaps [offset, offset+length): whole blocks become UNMAPPED, partial ranges read as zeros. */
  async trim(offset: number, length: number): Promise<void> {
    await this.zeroRange(offset, length, BlockState.Unmapped);
  }

  private async zeroRange(
    offset: number,
    length: number,
    wholeBlockState: BlockState.Zero | BlockState.Unmapped | 'keep',
  ): Promise<void> {
    this.assertWritable();
    this.assertRange(offset, length);
    if (length === 0) return;
    await this.lock.exclusive(async () => {
      const marking = this.observer?.beforeChange(offset, length);
      if (marking) await marking;
      await this.beginChange(true);
      const lss = this.logicalSectorSize;
      const start = Math.floor(offset / lss) * lss;
      const end = Math.ceil((offset + length) / lss) * lss;
      // Unaligned edges keep their other bytes: rewrite those sectors.
      const edges: [number, Buffer][] = [];
      for (const s of new Set([start, end - lss])) {
        if (s < offset || s + lss > offset + length) {
          const b = Buffer.alloc(lss);
          await this.readVirtual(b, s);
          const from = Math.max(offset, s) - s;
          const to = Math.min(offset + length, s + lss) - s;
          b.fill(0, from, to);
          edges.push([s, b]);
        }
      }
      await this.forEachBlock(start, end - start, async (block, inBlock, _pos, n) => {
        const whole = inBlock === 0 && n >= this.blockExtent(block);
        const e = await this.payloadEntry(block);
        const index = payloadBatIndex(this.geometry, block);
        if (whole && wholeBlockState !== 'keep' && this.params.hasParent) {
          // ZERO and UNMAPPED would hide the parent here too (the spec says ZERO reads zeros), but
          // libvhdi reads such blocks from the parent: a block of this file's own zeros reads the same
          // everywhere. A fresh block costs nothing (the file grows sparsely).
          if (e.state === BlockState.FullyPresent || e.state === BlockState.PartiallyPresent) {
            this.checkPayloadOffset(block, e.offset);
            let at = 0;
            for (const z of zeroPieces(this.blockExtent(block))) {
              await this.file.write(z, e.offset + at);
              at += z.length;
            }
            if (e.state === BlockState.PartiallyPresent)
              await this.setBatEntry(index, BlockState.FullyPresent, e.offset);
          } else {
            const at = await this.allocate(this.blockSize);
            await this.setBatEntry(index, BlockState.FullyPresent, at);
            this.noteAllocated(index, this.blockExtent(block), 0, 0);
          }
          return;
        }
        if (whole && wholeBlockState !== 'keep' && !this.params.leaveBlockAllocated) {
          // Blocks that already read zeros stay as they are; others are deallocated.
          const readsZero =
            e.state === BlockState.NotPresent || e.state === BlockState.Zero || e.state === BlockState.Unmapped;
          if (!readsZero) await this.setBatEntry(index, wholeBlockState, 0);
          return;
        }
        const readsZero =
          e.state === BlockState.Zero ||
          e.state === BlockState.Unmapped ||
          e.state === BlockState.Undefined ||
          (e.state === BlockState.NotPresent && !this.params.hasParent);
        if (readsZero) return;
        if (e.state === BlockState.FullyPresent && this.isFresh(index, inBlock, inBlock + n)) return;
        let at = inBlock;
        for (const z of zeroPieces(n)) {
          await this.writeBlock(block, at, z);
          at += z.length;
        }
      });
      for (const [s, b] of edges) {
        const block = Math.floor(s / this.blockSize);
        await this.writeBlock(block, s - block * this.blockSize, b);
      }
    });
  }

  /**
   * Flush-and-hold: commits, then runs `fn` while every other read and write waits. What `fn` sees is
   * durable and cannot change under it (seals and checkpoints cut their instant here). With `cleanLog`
   * the log is also left clean, as close leaves it, while `fn` runs (see `flush`).
   */
  async flushAndHold<T>(fn: () => Promise<T>, opts: { cleanLog?: boolean } = {}): Promise<T> {
    this.assertOpen();
    return this.lock.exclusive(async () => {
      if (!this.writable) return fn();
      const applied = await this.commit();
      if (!opts.cleanLog) return fn();
      // Both run to the end before the hold is released, whichever fails.
      const [out, clean] = await Promise.allSettled([fn(), this.cleanLog(applied)]);
      if (out.status === 'rejected') throw out.reason;
      if (clean.status === 'rejected') throw clean.reason;
      return out.value;
    });
  }

  /** Installs a new DataWriteGuid now, as the first guest-visible change would (merge uses it). */
  async markDataChanged(): Promise<void> {
    this.assertWritable();
    await this.lock.exclusive(() => this.beginChange(true));
  }

  /**
   * Commits pending metadata through the log and makes every completed write durable. With `cleanLog` the
   * header then says the log is clean (LogGuid zero), as after a close, while the file stays open: a reader
   * of the file alone needs no replay, and the next change starts a new log.
   */
  async flush(opts: { cleanLog?: boolean } = {}): Promise<void> {
    this.assertOpen();
    if (!this.writable) return;
    await this.lock.exclusive(async () => {
      const applied = await this.commit();
      if (opts.cleanLog) await this.cleanLog(applied);
    });
  }

  /**
   * After a commit, with the lock held: the updates it applied in place made durable (unless it applied
   * none: its first sync covered everything), then the log marked clean.
   */
  private async cleanLog(applied: boolean): Promise<void> {
    if (!this.logWriter) return;
    if (applied) await this.file.datasync();
    await writeHeaders(this.file, this.headerState, { logGuid: GUID_ZERO });
    this.logWriter = undefined;
  }

  /**
   * Turns this writable disk into a read-only parent in place (a checkpoint's frozen point): what is
   * pending is committed and the log left clean, as a close would, then every write is refused. The file
   * stays open with its metadata cache, so a child opened over it (`OpenOptions.parent`) reads through it
   * at once. No I/O when nothing changed since a `flush({ cleanLog: true })`.
   */
  async retire(): Promise<void> {
    this.assertOpen();
    if (!this.writable) return;
    await this.lock.exclusive(async () => {
      if (this.cache.dirtyCount > 0 || this.logWriter) await this.cleanLog(await this.commit());
      this.canWrite = false;
    });
    // A frozen parent now: other writers stay out, readers (qemu-img info) are let in, as QEMU does for
    // a backing file.
    await this.file.relock?.('reader');
  }

  /** Returns whether log entries were applied in place (then not yet durable there). */
  private async commit(): Promise<boolean> {
    await this.file.datasync();
    const dirty = this.cache.dirtyOffsets();
    if (dirty.length === 0) return false;
    const writer = this.logWriter!;
    const max = writer.maxDataOps;
    for (let i = 0; i < dirty.length; i += max) {
      const part = dirty.slice(i, i + max);
      const ops: LogOp[] = part.map((o) => ({ kind: 'data', fileOffset: o, data: this.cache.peek(o)! }));
      const flushed = Math.floor(this.file.size() / MiB) * MiB;
      for (const w of writer.nextEntry(ops, flushed, this.fileEnd)) await this.file.write(w.data, w.offset);
      await this.file.datasync();
      await applyOps(this.file, ops);
      this.cache.clean(part);
      // Before the ring can reuse this entry's space, its updates must be durable in place.
      if (i + max < dirty.length) await this.file.datasync();
    }
    this.batChanged.clear();
    return true;
  }

  /** Rewrites `data` at `fileOffset` (metadata: region table, metadata region) through the log. */
  private async logWrite(fileOffset: number, data: Buffer, windowStart: number, windowEnd: number): Promise<void> {
    for (let pos = 0; pos < data.length;) {
      const abs = fileOffset + pos;
      const sec = abs - (abs % LOG_SECTOR);
      const buf = await this.cache.load(sec, windowStart, windowEnd);
      const from = abs - sec;
      const n = Math.min(LOG_SECTOR - from, data.length - pos);
      if (Buffer.compare(buf.subarray(from, from + n), data.subarray(pos, pos + n)) !== 0) {
        data.copy(buf, from, pos, pos + n);
        this.cache.markDirty(sec);
      }
      pos += n;
    }
  }

  /** Replaces the parent locator (metadata, not guest-visible): merge and re-linking use it. */
  async setParentLocator(loc: ParentLocator): Promise<void> {
    this.assertWritable();
    if (!this.params.hasParent) throw new TidemarkError('INVALID_ARGUMENT', `${this.path} is not a differencing disk`);
    await this.lock.exclusive(async () => {
      await this.beginChange(false);
      const md = this.metadataRegion;
      const items: { entry: MetadataEntry; data: Buffer }[] = [];
      let total = METADATA_TABLE_SIZE;
      for (const e of this.metadataEntries) {
        const isLocator = !e.isUser && guidEquals(e.itemId, ITEM_PARENT_LOCATOR);
        const data = isLocator ? encodeParentLocator(loc) : Buffer.alloc(e.length);
        if (!isLocator && e.length > 0) await this.file.read(data, md.fileOffset + e.offset);
        total += data.length;
        if (total > Math.min(md.length, MAX_ALLOCATION)) {
          throw new TidemarkError(
            'LIMIT_EXCEEDED',
            `metadata items no longer fit in the ${md.length}-byte metadata region`,
          );
        }
        items.push({ entry: e, data });
      }
      const region = Buffer.alloc(total);
      let at = METADATA_TABLE_SIZE;
      const entries: MetadataEntry[] = items.map(({ entry, data }) => {
        const placed = { ...entry, offset: data.length === 0 ? 0 : at, length: data.length };
        data.copy(region, at);
        at += data.length;
        return placed;
      });
      encodeMetadataTable(entries).copy(region, 0);
      await this.logWrite(md.fileOffset, region, md.fileOffset, md.fileOffset + md.length);
      this.metadataEntries.splice(0, this.metadataEntries.length, ...entries);
      this.parentLocator = loc;
    });
  }

  /**
   * `check --repair`: a header update rewrites both header slots; a damaged or stale region table
   * copy is rewritten from the one in use (through the log); entries whose space is not their own are
   * repaired (`repairPlacement`); BAT entries get their reserved bits cleared. Returns what was repaired.
   * The only write a damaged file accepts.
   */
  async repairStructures(): Promise<string[]> {
    this.assertOpen();
    if (!this.canWrite) throw new TidemarkError('READ_ONLY', `${this.path} is open read-only`);
    const repaired: string[] = [];
    await this.lock.exclusive(async () => {
      this.headerSlots.forEach((h, i) => {
        if (typeof h === 'string') repaired.push(`header ${i + 1} rewritten (was: ${h})`);
      });
      await this.beginChange(false);
      const good = this.regionTableInUse;
      const other = good === 0 ? 1 : 0;
      const a = this.regionTables[good] as RegionTable;
      const b = this.regionTables[other];
      if (typeof b === 'string' || b.checksum !== a.checksum) {
        const raw = Buffer.alloc(REGION_TABLE_SIZE);
        await this.file.read(raw, REGION_TABLE_OFFSETS[good]);
        const at = REGION_TABLE_OFFSETS[other];
        await this.logWrite(at, raw, at, at + REGION_TABLE_SIZE);
        repaired.push(`region table ${other + 1} rewritten from table ${good + 1}`);
      }
      // What exists decides what a damaged entry keeps, also once the file is extended below.
      const size = this.file.size();
      // A file cut short inside its structures, or not on a 1 MiB boundary, is extended (sparsely): BAT
      // entries that were cut off then read NOT_PRESENT; their data is lost either way.
      const cut = this.placementScan.spans.filter((x) => x.end > size && x.end <= MAX_FILE_OFFSET);
      const to = Math.max(Math.ceil(size / MiB) * MiB, ...cut.map((x) => x.end));
      if (to > size) {
        await this.file.truncate(to);
        const inside = cut.length > 0 ? `inside ${cut.map((x) => x.name).join(' and ')}` : 'off a 1 MiB boundary';
        repaired.push(`the file ended at ${size}, ${inside}: extended to ${to}`);
      }
      repaired.push(...(await this.repairPlacement(size)));
      // What the repairs left (entries moved, the file extended) is what later changes are checked against.
      if (!this.placementScan.clean) await this.scanPlacement();
      let cleared = 0;
      let droppedBitmaps = 0;
      const piece = Buffer.alloc(Math.min(MiB, this.geometry.batEntries * 8));
      for (let first = 0; first < this.geometry.batEntries; first += MiB / 8) {
        const view = piece.subarray(0, Math.min(MiB / 8, this.geometry.batEntries - first) * 8);
        await this.readBatRaw(view, first);
        for (let i = 0; i < view.length / 8; i++) {
          const e = decodeBatEntry(view.readUInt32LE(i * 8), view.readUInt32LE(i * 8 + 4));
          const index = first + i;
          const bitmap = index % (this.geometry.chunkRatio + 1) === this.geometry.chunkRatio;
          if (bitmap && !this.params.hasParent && e.state !== SB_NOT_PRESENT) {
            // Only differencing disks have sector bitmaps; one elsewhere is never read.
            await this.setBatEntry(index, SB_NOT_PRESENT, 0);
            droppedBitmaps++;
          } else if (e.reservedBits !== 0) {
            await this.setBatEntry(index, e.state, e.offset);
            cleared++;
          } else continue;
          await this.commitIfLarge();
        }
      }
      if (cleared > 0) repaired.push(`reserved bits cleared in ${cleared} BAT entries`);
      if (droppedBitmaps > 0)
        repaired.push(`${droppedBitmaps} sector bitmap entries set to NOT_PRESENT (a disk without a parent has none)`);
      await this.commit();
      // What is left (nothing the repairs above cover) decides whether the file can be written.
      await this.scanPlacement();
    });
    return repaired;
  }

  /** Commits early once many metadata sectors are pending (a repair of a huge BAT stays in bounded memory). */
  private async commitIfLarge(): Promise<void> {
    if (this.cache.dirtyCount >= REPAIR_COMMIT_SECTORS) await this.commit();
  }

  /**
   * Repairs entries whose space is not their own, so that no read that worked before returns other bytes:
   * 1. an entry with nothing of its own (wholly in the header section, the log or a region, wholly past
   *    the end of the file, or beyond 128 TiB) becomes ZERO (NOT_PRESENT in a differencing disk: the block
   *    reads its parent again); a lost sector bitmap becomes NOT_PRESENT with the partially present blocks
   *    of its chunk, whose present sectors it no longer names. These changes are committed first.
   * 2. every other damaged entry (one that overlaps a structure or the end of the file in part, or claims
   *    space an earlier entry holds) moves to new space past everything any entry still claims, with a
   *    copy of its bytes that lie in the file and outside every structure: a block that only shared space
   *    reads exactly as before, a truncated one keeps what exists and reads zeros for the rest.
   * The DataWriteGuid does not change (no read that succeeded changes), so children stay linked.
   * `size`: the file size that says what exists (before any repair extended the file).
   */
  private async repairPlacement(size: number): Promise<string[]> {
    if (this.placementScan.damagedCount === 0) return [];
    const lines: string[] = [];
    let unlisted = 0;
    const note = (line: string) => {
      if (lines.length < MAX_REPAIR_LINES) lines.push(line);
      else unlisted++;
    };
    const name = (d: Damaged) =>
      `${describeEntry(d.entry)} (BAT entry ${d.entry.index}) at file offset ${d.entry.offset} ${describeProblems(d, size)}`;
    const why = (d: Damaged) =>
      d.problems.some((x) => x.kind === 'eof')
        ? 'its data was lost with the end of the file'
        : 'the bytes it pointed at were not its data';

    const g = this.geometry;
    const lostChunks = new Set<number>();
    const drop = async (d: Damaged) => {
      const e = d.entry;
      if (e.bitmap) {
        await this.setBatEntry(e.index, SB_NOT_PRESENT, 0);
        lostChunks.add(e.number);
        note(
          `${name(d)}: set to NOT_PRESENT with the partially present blocks of its chunk (they read from the parent again)`,
        );
      } else if (this.params.hasParent) {
        await this.setBatEntry(e.index, BlockState.NotPresent, 0);
        note(`${name(d)}: set to NOT_PRESENT (it reads from the parent again; ${why(d)})`);
      } else {
        await this.setBatEntry(e.index, BlockState.Zero, 0);
        note(`${name(d)}: set to ZERO (it reads zeros; ${why(d)})`);
      }
      await this.commitIfLarge();
    };
    /** The partially present blocks of chunks whose sector bitmap was dropped read the parent again. */
    const dropPartialBlocks = async () => {
      for (const chunk of lostChunks) {
        for (let b = chunk * g.chunkRatio; b < Math.min((chunk + 1) * g.chunkRatio, g.dataBlocks); b++) {
          const index = payloadBatIndex(g, b);
          if ((await this.batEntry(index)).state === BlockState.PartiallyPresent)
            await this.setBatEntry(index, BlockState.NotPresent, 0);
        }
        await this.commitIfLarge();
      }
      lostChunks.clear();
    };

    const first = await this.placementPass(size, { listLimit: 0, onDamaged: (d) => (d.lost ? drop(d) : undefined) });
    await dropPartialBlocks();
    await this.commit();
    await this.file.datasync();

    // New space starts past every entry still allocated: a crash before the next commit leaves data there
    // that no entry claims.
    this.fileEnd = this.endPast(first, first.keptEnd);
    const copy = Buffer.alloc(Math.min(COPY_PIECE, g.blockSize));
    await this.placementPass(size, {
      listLimit: 0,
      onDamaged: async (d) => {
        // Lost only now: it shared space with an entry dropped above, and has nothing else of its own.
        if (d.lost) return drop(d);
        const e = d.entry;
        const at = await this.allocate(e.bitmap ? MiB : this.blockSize);
        let kept = 0;
        for (const [a, b] of first.readablePieces(e.offset, e.extent)) {
          for (let pos = a; pos < b; pos += copy.length) {
            const part = copy.subarray(0, Math.min(copy.length, b - pos));
            await this.file.read(part, pos);
            if (!isAllZero(part)) await this.file.write(part, at + (pos - e.offset));
            kept += part.length;
          }
        }
        await this.setBatEntry(e.index, e.state, at);
        const outcome = kept === e.extent ? 'it reads as before' : `the other ${e.extent - kept} bytes read zeros`;
        note(`${name(d)}: moved to file offset ${at} with a copy of the ${kept} bytes that are its own; ${outcome}`);
        await this.commitIfLarge();
      },
    });
    await dropPartialBlocks();
    if (unlisted > 0) lines.push(`${unlisted} more BAT entries repaired the same way (not listed)`);
    return lines;
  }

  /** Flushes, marks the log clean and closes this file and its parents. */
  async close(): Promise<void> {
    if (this.closed) return;
    await this.observer?.beforeClose?.();
    try {
      if (this.writable && this.logWriter) {
        await this.lock.exclusive(async () => {
          await this.commit();
          await this.file.datasync();
          await writeHeaders(this.file, this.headerState, { logGuid: GUID_ZERO });
        });
      }
    } finally {
      await this.closeFiles();
    }
    await this.observer?.afterClose?.();
  }

  /**
   * Closes without flushing or cleaning the log, as if the process had died: for crash tests, and
   * for giving up on a file after an I/O error.
   */
  async abandon(): Promise<void> {
    await this.closeFiles();
  }

  private async closeFiles(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      await this.file.close();
    } finally {
      if (this.parent) await this.parent.close();
    }
  }
}

/** The headers this process wrote last (or is writing), by file path (any instance): see `headersOnDiskDiffer`. */
const headersWritten = new Map<string, VhdxHeader[]>();
/** Two per header update (both slots), and the update before. */
const RECENT_HEADERS = 4;

/** Header update (MS-VHDX 2.2.2.1): write the non-current slot with seq+1, flush; then the other, flush. */
async function writeHeaders(file: RandomAccessFile, state: HeaderState, changes: Partial<VhdxHeader>): Promise<void> {
  if (state.header.sequenceNumber >= (1n << 64n) - 2n) {
    throw new VhdxCorruptError(
      'header',
      HEADER_OFFSETS[state.slot],
      `sequence number ${state.header.sequenceNumber} cannot be incremented`,
      'VHDX_UNSUPPORTED',
    );
  }
  for (let i = 0; i < 2; i++) {
    const next: VhdxHeader = {
      ...state.header,
      ...changes,
      sequenceNumber: state.header.sequenceNumber + 1n,
      checksum: 0,
    };
    const slot: 0 | 1 = state.slot === 0 ? 1 : 0;
    // Known before it lands: a check that reads the file meanwhile finds one of ours.
    const recent = headersWritten.get(file.path) ?? [];
    headersWritten.set(file.path, [...recent.slice(-(RECENT_HEADERS - 1)), next]);
    await file.write(encodeHeader(next), HEADER_OFFSETS[slot]);
    await file.datasync();
    state.header = next;
    state.slot = slot;
  }
}

/** Writes log updates in place, coalescing adjacent sectors. */
async function applyOps(
  file: RandomAccessFile,
  ops: LogOp[],
  st: { solid: number; sectors: Set<number> } = { solid: file.size(), sectors: new Set() },
): Promise<void> {
  for (let i = 0; i < ops.length;) {
    const op = ops[i];
    if (op.kind === 'zero') {
      // Only bytes that hold data need zeroing: the file as it was before replay, and the sectors this
      // replay wrote past it. The rest of the range reads zeros once the file is long enough.
      const end = op.fileOffset + op.length;
      let at = op.fileOffset;
      for (const z of zeroPieces(Math.max(0, Math.min(end, st.solid) - op.fileOffset))) {
        await file.write(z, at);
        at += z.length;
      }
      for (const sector of st.sectors) {
        if (sector >= Math.max(op.fileOffset, st.solid) && sector < end)
          await file.write(Buffer.alloc(LOG_SECTOR), sector);
      }
      if (end > file.size()) await file.truncate(end);
      i++;
      continue;
    }
    let j = i + 1;
    while (j < ops.length && ops[j].kind === 'data' && ops[j].fileOffset === ops[j - 1].fileOffset + LOG_SECTOR) j++;
    const run = ops.slice(i, j) as Extract<LogOp, { kind: 'data' }>[];
    for (const r of run) if (r.fileOffset >= st.solid) st.sectors.add(r.fileOffset);
    await file.write(run.length === 1 ? run[0].data : Buffer.concat(run.map((r) => r.data)), op.fileOffset);
    i = j;
  }
}

/**
 * A file without the VHDX identifier that another format's magic identifies (a VHD footer, a qcow2
 * header...) is refused as NOT_SUPPORTED naming that format; anything else falls through to "not a VHDX".
 */
async function refuseOtherFormats(filePath: string, base: RandomAccessFile, section: Buffer): Promise<void> {
  const size = base.size();
  const tail = Buffer.alloc(Math.min(size, DETECT_TAIL_BYTES));
  if (tail.length > 0) await base.read(tail, size - tail.length);
  const found = detectFromBytes(section.subarray(0, Math.min(size, DETECT_HEAD_BYTES)), tail, size);
  if (found.format !== 'raw' && found.format !== 'vhdx') throw unsupportedFormatError(filePath, found);
}
