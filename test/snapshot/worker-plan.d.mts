// Types for worker-plan.mjs (plain ESM so the snapshot worker can run it without a TypeScript loader).
export type PlannedOp =
  { file: number; kind: 'truncate'; size: number } | { file: number; kind: 'write'; offset: number; data: Buffer };
export declare function mulberry(seed: number): () => number;
export declare function randomBytes(seed: number, length: number): Buffer;
export declare function initialContent(seed: number, index: number, size: number): Buffer;
export declare function planOp(seed: number, i: number, files: number, maxSize: number): PlannedOp;
export declare function applyOp(contents: Buffer[], op: PlannedOp): Buffer[];
