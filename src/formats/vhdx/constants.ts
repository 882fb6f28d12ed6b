import { guidFromString } from '../../util/guid.js';

export const KiB = 1024;
export const MiB = 1024 * 1024;
export const GiB = 1024 * MiB;
export const TiB = 1024 * GiB;

export const FILE_IDENTIFIER_OFFSET = 0;
export const HEADER_OFFSETS = [64 * KiB, 128 * KiB] as const;
export const REGION_TABLE_OFFSETS = [192 * KiB, 256 * KiB] as const;
export const HEADER_SECTION_SIZE = MiB;
export const HEADER_SIZE = 4 * KiB;
export const REGION_TABLE_SIZE = 64 * KiB;
export const METADATA_TABLE_SIZE = 64 * KiB;
export const LOG_SECTOR = 4 * KiB;

export const MAX_VIRTUAL_SIZE = 64 * TiB;
export const MIN_BLOCK_SIZE = MiB;
export const MAX_BLOCK_SIZE = 256 * MiB;
/** Largest structure the engine will hold in memory at once, whatever a file claims. */
export const MAX_ALLOCATION = 256 * MiB;
/** Logs bigger than this are refused: replay keeps the active sequence in memory. */
export const MAX_LOG_LENGTH = 64 * MiB;
/** No valid file needs to reach beyond this offset (64 TiB of data plus metadata). */
export const MAX_FILE_OFFSET = 128 * TiB;
/** Differencing chains deeper than this are refused (protects against locator loops). */
export const MAX_CHAIN_DEPTH = 256;

export const SIG_FILE = 'vhdxfile';
export const SIG_HEADER = 0x64616568; // "head"
export const SIG_REGION = 0x69676572; // "regi"
export const SIG_METADATA = 'metadata';
export const SIG_LOG_ENTRY = 0x65676f6c; // "loge"
export const SIG_ZERO_DESC = 0x6f72657a; // "zero"
export const SIG_DATA_DESC = 0x63736564; // "desc"
export const SIG_DATA_SECTOR = 0x61746164; // "data"

export const REGION_BAT = guidFromString('2DC27766-F623-4200-9D64-115E9BFD4A08');
export const REGION_METADATA = guidFromString('8B7CA206-4790-4B9A-B8FE-575F050F886E');

export const ITEM_FILE_PARAMETERS = guidFromString('CAA16737-FA36-4D43-B3B6-33F0AA44E76B');
export const ITEM_VIRTUAL_DISK_SIZE = guidFromString('2FA54224-CD1B-4876-B211-5DBED83BF4B8');
export const ITEM_VIRTUAL_DISK_ID = guidFromString('BECA12AB-B2E6-4523-93EF-C309E000C746');
export const ITEM_LOGICAL_SECTOR_SIZE = guidFromString('8141BF1D-A96F-4709-BA47-F233A8FAAB5F');
export const ITEM_PHYSICAL_SECTOR_SIZE = guidFromString('CDA348C7-445D-4471-9CC9-E9885251C556');
export const ITEM_PARENT_LOCATOR = guidFromString('A8D35F2D-B30B-454D-ABF7-D3D84834AB0C');
export const PARENT_LOCATOR_TYPE_VHDX = guidFromString('B04AEFB7-D19E-4A81-B789-25B8E9445913');

/** Payload BAT entry states (MS-VHDX 2.5.1.1) and sector bitmap states (2.5.1.2). */
export const enum BlockState {
  NotPresent = 0,
  Undefined = 1,
  Zero = 2,
  Unmapped = 3,
  FullyPresent = 6,
  PartiallyPresent = 7,
}
export const SB_NOT_PRESENT = 0;
export const SB_PRESENT = 6;

export const BLOCK_STATE_NAMES: Record<number, string> = {
  0: 'not_present',
  1: 'undefined',
  2: 'zero',
  3: 'unmapped',
  6: 'fully_present',
  7: 'partially_present',
};

export const CREATOR = 'Tidemark';
