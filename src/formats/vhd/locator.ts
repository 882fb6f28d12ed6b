/**
 * Parent locator data of differencing disks, as decode/encode pairs per platform code, and the host
 * paths they lead to. W2ru / W2ku: relative / absolute Windows paths in UTF-16LE; Wi2r / Wi2k: their
 * deprecated ANSI forms; MacX: a file URL in UTF-8; Mac: a Mac OS alias record. Windows paths go through
 * the VHDX engine's mapping (drive letters, volumes and shares to host directories; `Z:` is the POSIX
 * root); whatever a locator says, the open only follows paths inside the allowed directories.
 */
import path from 'node:path';
import { GUID_ZERO } from '../../util/guid.js';
import { parentCandidates, type LocatorOptions } from '../vhdx/locator.js';
import { MAX_LOCATOR_DATA, PLATFORM, platformName, type PlatformName } from './constants.js';

export interface LocatorData {
  platform: PlatformName;
  /** The text as stored (a path or URL), or a one-line description of an alias record. */
  value: string;
  /** A POSIX path (MacX URLs on localhost, alias records that carry one). */
  posixPath?: string;
  /** The parent's file name (alias records). */
  fileName?: string;
}

/** Decodes the data of one locator entry; a string says why it cannot be used. */
export function decodeLocatorData(code: number, data: Uint8Array): LocatorData | string {
  const platform = platformName(code);
  if (!platform) return `unknown platform code 0x${code.toString(16).padStart(8, '0')}`;
  if (data.length === 0) return 'no data';
  if (data.length > MAX_LOCATOR_DATA) return `data of ${data.length} bytes exceeds ${MAX_LOCATOR_DATA}`;
  const b = Buffer.from(data.buffer, data.byteOffset, data.length);
  switch (platform) {
    case 'W2ru':
    case 'W2ku': {
      if (b.length % 2 !== 0) return `UTF-16 data of odd length ${b.length}`;
      const value = untilNul(b.toString('utf16le'));
      return value ? { platform, value } : 'empty path';
    }
    case 'Wi2r':
    case 'Wi2k': {
      const value = untilNul(b.toString('latin1'));
      return value ? { platform, value } : 'empty path';
    }
    case 'MacX': {
      const value = untilNul(b.toString('utf8'));
      const m = /^file:\/\/(localhost)?(\/.*)$/i.exec(value);
      if (!m) return { platform, value }; // a URL for another host: kept for info, leads nowhere here
      try {
        return { platform, value, posixPath: m[2].split('/').map(decodeURIComponent).join('/') };
      } catch {
        return `malformed file URL ${JSON.stringify(value.slice(0, 200))}`;
      }
    }
    case 'Mac':
      return decodeAlias(b);
  }
}

/** Encodes locator data: W2*: UTF-16LE, Wi2*: ANSI, MacX: `value` (a POSIX path) as a file URL, Mac: an alias. */
export function encodeLocatorData(platform: PlatformName, value: string): Buffer {
  switch (platform) {
    case 'W2ru':
    case 'W2ku':
      return Buffer.from(value, 'utf16le');
    case 'Wi2r':
    case 'Wi2k':
      return Buffer.from(value, 'latin1');
    case 'MacX':
      return Buffer.from(posixToFileUrl(value), 'utf8');
    case 'Mac':
      return encodeAlias(value);
  }
}

/** `file://localhost/dir/parent.vhd`, each path segment percent-encoded (RFC 2396). */
export function posixToFileUrl(p: string): string {
  return `file://localhost${path.posix.resolve('/', p).split('/').map(encodeURIComponent).join('/')}`;
}

function untilNul(s: string): string {
  const nul = s.indexOf('\0');
  return nul >= 0 ? s.slice(0, nul) : s;
}

// ------------------------------------------------------------------ Mac OS alias records (version 2)

/** Fixed part of a version-2 alias record; tagged items follow it. */
const ALIAS_FIXED = 150;
const TAG_UNICODE_NAME = 14;
const TAG_POSIX_PATH = 18;
const TAG_POSIX_MOUNT = 19;
const TAG_END = 0xffff;

function decodeAlias(b: Buffer): LocatorData | string {
  if (b.length < ALIAS_FIXED) return `alias record of ${b.length} bytes is shorter than ${ALIAS_FIXED}`;
  const version = b.readUInt16BE(6);
  if (version !== 2) return `alias record version ${version} is not supported (only 2)`;
  const size = Math.min(b.length, Math.max(ALIAS_FIXED, b.readUInt16BE(4)));
  const nameLen = Math.min(b[50], 63);
  let fileName = b.toString('latin1', 51, 51 + nameLen) || undefined;
  let posix: string | undefined;
  let mount: string | undefined;
  for (let at = ALIAS_FIXED; at + 4 <= size;) {
    const tag = b.readUInt16BE(at);
    const len = b.readUInt16BE(at + 2);
    if (tag === TAG_END) break;
    const data = b.subarray(at + 4, Math.min(size, at + 4 + len));
    if (data.length < len) return `alias tag ${tag} of ${len} bytes runs past the record`;
    if (tag === TAG_POSIX_PATH) posix = untilNul(data.toString('utf8'));
    else if (tag === TAG_POSIX_MOUNT) mount = untilNul(data.toString('utf8'));
    else if (tag === TAG_UNICODE_NAME && len >= 2) {
      const chars = Math.min(data.readUInt16BE(0), (len - 2) >> 1);
      const le = Buffer.alloc(chars * 2);
      for (let i = 0; i < chars; i++) le.writeUInt16LE(data.readUInt16BE(2 + i * 2), i * 2);
      fileName = le.toString('utf16le') || fileName;
    }
    at += 4 + len + (len & 1);
  }
  // The POSIX path is relative to the volume's mount point ("/" for the boot volume).
  const posixPath = posix ? path.posix.join(mount ?? '/', posix.startsWith('/') ? posix : `/${posix}`) : undefined;
  const value = `alias: ${fileName ?? '(no name)'}${posixPath ? ` at ${posixPath}` : ''}`;
  return { platform: 'Mac', value, posixPath, fileName };
}

/** A version-2 alias record naming the POSIX path `p` on the boot volume (name, POSIX path, mount point). */
export function encodeAlias(p: string): Buffer {
  const abs = path.posix.resolve('/', p);
  const name = path.posix.basename(abs);
  const tags: Buffer[] = [];
  const tag = (type: number, data: Buffer) => {
    const h = Buffer.alloc(4);
    h.writeUInt16BE(type, 0);
    h.writeUInt16BE(data.length, 2);
    tags.push(h, data, Buffer.alloc(data.length & 1));
  };
  const utf16 = Buffer.from(name, 'utf16le');
  const uname = Buffer.alloc(2 + utf16.length);
  uname.writeUInt16BE(utf16.length / 2, 0);
  for (let i = 0; i < utf16.length; i += 2) uname.writeUInt16BE(utf16.readUInt16LE(i), 2 + i);
  tag(TAG_UNICODE_NAME, uname);
  tag(TAG_POSIX_PATH, Buffer.from(abs, 'utf8'));
  tag(TAG_POSIX_MOUNT, Buffer.from('/', 'utf8'));
  tags.push(Buffer.from([0xff, 0xff, 0, 0]));
  const fixed = Buffer.alloc(ALIAS_FIXED);
  fixed.writeUInt16BE(2, 6); // version
  const vol = Buffer.from('Macintosh HD', 'latin1');
  fixed[10] = vol.length;
  vol.copy(fixed, 11);
  fixed.write('H+', 42, 'latin1');
  const ascii = Buffer.from(name.replace(/[^\x20-\x7e]/g, '_').slice(0, 63), 'latin1');
  fixed[50] = ascii.length;
  ascii.copy(fixed, 51);
  fixed.writeInt16BE(-1, 130); // nlvlFrom: unknown
  fixed.writeInt16BE(-1, 132); // nlvlTo
  const out = Buffer.concat([fixed, ...tags]);
  out.writeUInt16BE(Math.min(out.length, 0xffff), 4);
  return out;
}

// ------------------------------------------------------------------ where the parent may be

export type VhdLocatorKey = PlatformName | 'same_directory';

export interface VhdParentCandidate {
  key: VhdLocatorKey;
  value: string;
  hostPath: string | undefined;
}

/** One Windows path through the VHDX engine's mapping (relative to the child, or drive/volume/share mapped). */
function windowsHostPath(
  childPath: string,
  key: 'relative_path' | 'absolute_win32_path',
  value: string,
  opts: LocatorOptions,
): string | undefined {
  return parentCandidates(childPath, { locatorType: GUID_ZERO, entries: [[key, value]] }, opts).find(
    (c) => c.key === key,
  )?.hostPath;
}

/**
 * Where to look for the parent, in order: W2ru, W2ku (the Windows forms), MacX, Mac, the deprecated Wi2r
 * and Wi2k, then (as libvhdi does) each distinct file name they and the header's parent name give, in the
 * child's directory.
 */
export function vhdParentCandidates(
  childPath: string,
  locators: LocatorData[],
  parentName: string,
  opts: LocatorOptions,
): VhdParentCandidate[] {
  const out: VhdParentCandidate[] = [];
  const order: PlatformName[] = ['W2ru', 'W2ku', 'MacX', 'Mac', 'Wi2r', 'Wi2k'];
  const names: string[] = [];
  for (const platform of order) {
    for (const l of locators.filter((x) => x.platform === platform)) {
      let hostPath: string | undefined;
      if (platform === 'W2ru' || platform === 'Wi2r') {
        hostPath = windowsHostPath(childPath, 'relative_path', l.value, opts);
        names.push(l.value);
      } else if (platform === 'W2ku' || platform === 'Wi2k') {
        hostPath = windowsHostPath(childPath, 'absolute_win32_path', l.value, opts);
        names.push(l.value);
      } else {
        hostPath = l.posixPath && path.posix.isAbsolute(l.posixPath) ? path.normalize(l.posixPath) : undefined;
        if (l.posixPath) names.push(l.posixPath);
        if (l.fileName) names.push(l.fileName);
      }
      out.push({ key: platform, value: l.value, hostPath });
    }
  }
  if (parentName) names.push(parentName);
  const dir = path.dirname(childPath);
  const seen = new Set<string>();
  for (const n of names) {
    const base = n.replace(/\\/g, '/').split('/').pop() ?? '';
    if (!base || base === '.' || base === '..' || seen.has(base)) continue;
    seen.add(base);
    out.push({ key: 'same_directory', value: base, hostPath: path.join(dir, base) });
  }
  return out;
}

export { PLATFORM };
