/**
 * Mapping a parent locator's Windows paths to host paths, and the allowed-roots rule: a locator is
 * input, so a crafted one must never make a disk open a file outside the directories the caller allows.
 */
import { realpath } from 'node:fs/promises';
import path from 'node:path';
import type { ParentLocator } from './metadata.js';
import { locatorGet } from './metadata.js';

export interface LocatorOptions {
  /** Directories (after symlink resolution) a parent may be opened from. */
  allowedRoots: string[];
  /**
   * Windows prefixes mapped to host directories, e.g. `{ "D:": "/mnt/d", "Volume{26a2...}": "/srv/vol1" }`.
   * `Z:` maps to `/` by default (the convention Tidemark writes on POSIX hosts, as Wine does).
   */
  pathMap?: Record<string, string>;
}

export interface ParentCandidate {
  key: 'relative_path' | 'volume_path' | 'absolute_win32_path' | 'same_directory';
  value: string;
  hostPath: string | undefined;
}

function windowsToPosix(rest: string): string {
  return rest.replace(/\\/g, '/');
}

function mapPrefixed(value: string, pathMap: Record<string, string>): string | undefined {
  // Strip the extended-length prefix \\?\ (and \\?\UNC\ for shares).
  let v = value;
  if (v.startsWith('\\\\?\\')) v = v.slice(4);
  const volume = /^(Volume\{[0-9a-fA-F-]+\})(\\.*)?$/.exec(v);
  const drive = /^([A-Za-z]:)(\\.*)?$/.exec(v);
  const unc = /^UNC\\([^\\]+\\[^\\]+)(\\.*)?$/i.exec(v) ?? /^\\\\([^\\]+\\[^\\]+)(\\.*)?$/.exec(v);
  const m = volume ?? drive ?? unc;
  if (!m) return undefined;
  const prefix = m[1];
  const rest = windowsToPosix(m[2] ?? '\\');
  const map: Record<string, string> = { 'Z:': '/', ...pathMap };
  const key = Object.keys(map).find((k) => k.toLowerCase() === prefix.toLowerCase());
  if (key === undefined) return undefined;
  return path.join(map[key], rest);
}

/** The places to look for the parent, in the order MS-VHDX prescribes, then beside the child. */
export function parentCandidates(childPath: string, loc: ParentLocator, opts: LocatorOptions): ParentCandidate[] {
  const dir = path.dirname(childPath);
  const out: ParentCandidate[] = [];
  const rel = locatorGet(loc, 'relative_path');
  if (rel !== undefined) {
    const p = windowsToPosix(rel);
    out.push({ key: 'relative_path', value: rel, hostPath: path.isAbsolute(p) ? undefined : path.resolve(dir, p) });
  }
  const vol = locatorGet(loc, 'volume_path');
  if (vol !== undefined) out.push({ key: 'volume_path', value: vol, hostPath: mapPrefixed(vol, opts.pathMap ?? {}) });
  const abs = locatorGet(loc, 'absolute_win32_path');
  if (abs !== undefined) {
    out.push({ key: 'absolute_win32_path', value: abs, hostPath: mapPrefixed(abs, opts.pathMap ?? {}) });
  }
  // Last resort, as libvhdi does: the parent's file name in the child's directory.
  const name = [rel, abs, vol].find((v) => v !== undefined);
  if (name !== undefined) {
    const base = windowsToPosix(name).split('/').pop() ?? '';
    if (base && base !== '.' && base !== '..') {
      out.push({ key: 'same_directory', value: base, hostPath: path.join(dir, base) });
    }
  }
  return out;
}

/** Resolves symlinks and checks the result lies inside one of the roots. */
export async function resolveInsideRoots(
  candidate: string,
  roots: string[],
): Promise<{ path: string } | { problem: 'missing' | 'outside' }> {
  let real: string;
  try {
    real = await realpath(candidate);
  } catch {
    return { problem: 'missing' };
  }
  for (const root of roots) {
    const rel = path.relative(root, real);
    if (rel === '' || (!rel.startsWith('..') && !path.isAbsolute(rel))) return { path: real };
  }
  return { problem: 'outside' };
}

export async function realRoots(roots: string[]): Promise<string[]> {
  const out: string[] = [];
  for (const r of roots) {
    try {
      out.push(await realpath(r));
    } catch {
      // a root that does not exist allows nothing
    }
  }
  return out;
}

/** relative_path as Windows writes it: backslashes, `.\name` for the same directory. */
export function relativeLocatorPath(childPath: string, parentPath: string): string {
  const rel = path.relative(path.dirname(path.resolve(childPath)), path.resolve(parentPath));
  const win = rel.split(path.sep).join('\\');
  return win.startsWith('..') ? win : `.\\${win}`;
}

/** absolute_win32_path for a POSIX path: `\\?\Z:\...`, Z: standing for the root (Wine's convention). */
export function absoluteLocatorPath(parentPath: string): string {
  const abs = path.resolve(parentPath);
  return `\\\\?\\Z:${abs.split('/').join('\\')}`;
}
