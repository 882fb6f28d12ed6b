/**
 * The API's wire shapes are its own (src/api imports nothing from src/host but the Host it serves, in
 * handlers.ts), and the host imports nothing from src/api or src/daemon: the constants both sides need are
 * repeated in src/api/schemas.ts, and this test checks they equal the host's, and that the layering holds.
 */
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import * as wire from '../../src/api/schemas.js';
import { CONFIG_VERSIONS } from '../../src/host/config-version.js';
import { ACCEL_REQUESTS } from '../../src/host/accel.js';
import { DEFINITION_VERSION, MAX_MEMORY_MIB, OWNER_NAME, SLOT, VM_NAME } from '../../src/host/definition.js';
import { VM_STATES } from '../../src/host/vm-runtime.js';
import { MAX_LEASE_TTL_SECONDS } from '../../src/host/leases.js';
import { REPO_ROOT } from '../helpers/fixtures.js';

function imports(dir: string): { file: string; from: string }[] {
  const out: { file: string; from: string }[] = [];
  for (const f of readdirSync(path.join(REPO_ROOT, 'src', dir))) {
    if (!f.endsWith('.ts')) continue;
    const text = readFileSync(path.join(REPO_ROOT, 'src', dir, f), 'utf8');
    for (const m of text.matchAll(/^import [^;]*? from '([^']+)';/gms)) out.push({ file: `${dir}/${f}`, from: m[1] });
  }
  return out;
}

describe('wire shapes and layering', () => {
  it("the wire's constants equal the host's", () => {
    expect(wire.VM_NAME.source).toBe(VM_NAME.source);
    expect(wire.SLOT.source).toBe(SLOT.source);
    expect(wire.OWNER_NAME.source).toBe(OWNER_NAME.source);
    expect(wire.OWNER_NAME.flags).toBe(OWNER_NAME.flags);
    expect([...wire.CONFIG_VERSIONS]).toEqual([...CONFIG_VERSIONS]);
    expect(wire.MAX_LEASE_TTL_SECONDS).toBe(MAX_LEASE_TTL_SECONDS);
    expect(wire.DEFINITION_VERSION).toBe(DEFINITION_VERSION);
    expect(wire.MAX_MEMORY_MIB).toBe(MAX_MEMORY_MIB);
    expect([...wire.VM_STATES]).toEqual([...VM_STATES]);
    expect([...wire.ACCEL_REQUESTS]).toEqual([...ACCEL_REQUESTS]);
  });

  it('the host imports nothing from the API or the daemon; the API takes only the Host type from the host', () => {
    const up = imports('host').filter((i) => /\.\.\/(api|daemon|cli|backup)\//.test(i.from));
    expect(up).toEqual([]);
    const fromHost = imports('api').filter((i) => i.from.startsWith('../host/'));
    expect(fromHost).toEqual([{ file: 'api/handlers.ts', from: '../host/host.js' }]);
    expect(readFileSync(path.join(REPO_ROOT, 'src', 'api', 'handlers.ts'), 'utf8')).toContain(
      "import type { Host } from '../host/host.js';",
    );
    // The backup application talks to the host only through the API client and its wire types.
    expect(imports('backup').filter((i) => i.from.startsWith('../host/'))).toEqual([]);
  });
});
