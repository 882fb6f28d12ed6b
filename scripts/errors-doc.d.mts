// Types of scripts/errors-doc.mjs, for test/errors.test.ts.
export declare const ERRORS_BEGIN: string;
export declare const ERRORS_END: string;
export declare function errorTable(maps: {
  meanings: Record<string, string>;
  exit: Record<string, number>;
  http: Record<string, number>;
}): string;
