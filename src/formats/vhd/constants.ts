/** Legacy VHD (Virtual Hard Disk Image Format Specification, Microsoft, 2006): sizes, cookies, limits. */
export const SECTOR = 512;
export const KiB = 1024;
export const MiB = 1024 * 1024;
export const GiB = 1024 * MiB;

export const FOOTER_SIZE = 512;
/** Virtual PC before 2004 wrote footers of 511 bytes (the reserved tail one byte shorter). */
export const OLD_FOOTER_SIZE = 511;
export const DYNAMIC_HEADER_SIZE = 1024;
export const LOCATOR_ENTRIES = 8;
export const LOCATOR_ENTRY_SIZE = 24;
export const PARENT_NAME_BYTES = 512;

export const COOKIE_FOOTER = 'conectix';
export const COOKIE_DYNAMIC = 'cxsparse';
/** Format version 1.0, in the footer and in the dynamic header. */
export const FORMAT_VERSION = 0x00010000;
/** Footer feature bits: 1 = temporary disk; 2 = reserved, always set. */
export const FEATURE_TEMPORARY = 1;
export const FEATURE_RESERVED = 2;
/** "No next structure": fixed disks' footer data offset and the dynamic header's data offset. */
export const NO_OFFSET = 0xffffffffffffffffn;
export const BAT_UNUSED = 0xffffffff;

export const enum DiskType {
  Fixed = 2,
  Dynamic = 3,
  Differencing = 4,
}
export const DISK_TYPE_NAMES: Record<number, 'fixed' | 'dynamic' | 'differencing'> = {
  2: 'fixed',
  3: 'dynamic',
  4: 'differencing',
};

/** Seconds between 1970-01-01 and 2000-01-01 (VHD time stamps count from 2000, UTC). */
export const VHD_EPOCH = 946684800;

/** 65535 cylinders × 16 heads × 255 sectors: the largest CHS geometry the footer can hold (~127 GiB). */
export const MAX_CHS_SECTORS = 65535 * 16 * 255;
/** The largest disk Windows and QEMU accept: 0xff000000 sectors = 2040 GiB. */
export const MAX_VIRTUAL_SIZE = 0xff000000 * SECTOR;

export const MIN_BLOCK_SIZE = SECTOR;
export const MAX_BLOCK_SIZE = 256 * MiB;
/** Block sizes `create` offers: Hyper-V's two (512 KiB and 2 MiB, the default) and 1 MiB between them. */
export const CREATE_BLOCK_SIZES = [512 * KiB, MiB, 2 * MiB] as const;
export const DEFAULT_BLOCK_SIZE = 2 * MiB;
/** BATs with more entries are refused: 2^24 entries (a 64 MiB table) cover 32 TiB in 2 MiB blocks. */
export const MAX_TABLE_ENTRIES = 2 ** 24;
/** Parent locator data longer than this is refused (a Windows path is at most 32767 UTF-16 units). */
export const MAX_LOCATOR_DATA = 64 * KiB;
/** Differencing chains deeper than this are refused (protects against locator loops). */
export const MAX_CHAIN_DEPTH = 256;
/** Largest single read the engine will allocate for a caller. */
export const MAX_ALLOCATION = 256 * MiB;

/** What Tidemark writes in the footer: creator application "tdmk" version 1.0, host "Wi2k" (as QEMU). */
export const CREATOR_APP = 'tdmk';
export const CREATOR_VERSION = 0x00010000;
export const CREATOR_HOST_OS = 'Wi2k';

/** Parent locator platform codes (four ASCII characters as a big-endian u32). */
export const PLATFORM = {
  None: 0,
  Wi2r: 0x57693272, // deprecated: relative path, ANSI
  Wi2k: 0x5769326b, // deprecated: absolute path, ANSI
  W2ru: 0x57327275, // relative Windows path, UTF-16LE
  W2ku: 0x57326b75, // absolute Windows path, UTF-16LE
  Mac: 0x4d616320, // Mac OS alias record (a blob)
  MacX: 0x4d616358, // file URL, UTF-8 (RFC 2396)
} as const;

export type PlatformName = Exclude<keyof typeof PLATFORM, 'None'>;

export function platformName(code: number): PlatformName | undefined {
  return (Object.keys(PLATFORM) as (keyof typeof PLATFORM)[]).find(
    (k): k is PlatformName => k !== 'None' && PLATFORM[k] === code,
  );
}

/** A u32 platform / creator code as its four characters (non-printable bytes as \xNN). */
export function fourCC(code: number): string {
  let s = '';
  for (const shift of [24, 16, 8, 0]) {
    const c = (code >>> shift) & 0xff;
    s += c >= 0x20 && c < 0x7f ? String.fromCharCode(c) : `\\x${c.toString(16).padStart(2, '0')}`;
  }
  return s;
}
