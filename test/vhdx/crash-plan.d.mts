// Types for crash-plan.mjs (plain ESM so the crash worker can run it without a TypeScript loader).
export declare const SECTOR: number;
export declare function mulberry(seed: number): () => number;
export declare function planWrite(seed: number, i: number, size: number): { offset: number; data: Buffer };
export declare function fillSector(buf: Buffer, seed: number, i: number, sector: number): void;
export declare function sectorWriteIndex(buf: Buffer, seed: number): number;
