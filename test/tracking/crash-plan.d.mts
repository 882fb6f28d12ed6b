// Types for crash-plan.mjs (plain ESM so the crash worker runs it without a TypeScript loader).
export interface PlannedOp {
  kind: 'write' | 'zero' | 'trim' | 'flush' | 'seal';
  offset: number;
  length: number;
  dataSeed: number;
}
export declare function words(seed: number): () => number;
export declare function planOp(seed: number, i: number, size: number): PlannedOp;
export declare function opData(op: PlannedOp): Buffer;
