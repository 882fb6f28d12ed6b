// Crash-test worker: writes through the engine (or merges, repairs, or only recovers) until it is killed with
// SIGKILL, either by the test process or by itself at a chosen I/O operation. It runs the built engine
// (dist/), as a real process would, so `npm run build` must have run (npm test does).
//
// Usage: node crash-worker.mjs '<json config>' (see Config in crash.test.ts)
//
// Protocol on stdout, one line each, written with a blocking write(2) before the next step:
//   F+              a flush begins
//   FLUSHED <n>     writes 0..n-1 are covered by a completed flush
//   CRASH <k> <op> <file> <phase> [torn] [power-loss]
//                   the worker kills itself instead of issuing its k-th file operation
//   DONE <ops>      finished (the disk was closed cleanly) after <ops> file operations
//
// Self-kills hook the engine's file layer (NodeFile): every write, truncate and datasync counts as an
// operation. `torn` first issues a 4 KiB-aligned prefix of the write it dies in. `powerLoss` models a
// machine losing power instead of a process dying: every 4 KiB page written since that file's last
// datasync keeps its new content or gets its old one back (each page independently), and a file grown
// since its last datasync may lose the growth.
import fs from 'node:fs';
import path from 'node:path';
import { checkVhdx } from '../../dist/formats/vhdx/check.js';
import { mergeIntoParent } from '../../dist/formats/vhdx/merge.js';
import { VhdxFile } from '../../dist/formats/vhdx/vhdx.js';
import { NodeFile } from '../../dist/util/file.js';
import { mulberry, planWrite } from './crash-plan.mjs';

const cfg = JSON.parse(process.argv[2]);
// Not process.stdout: towards a spawn() pipe (a socketpair) it queues in memory once the socket buffer
// is full (a few hundred small lines the test process has not read yet), and SIGKILL loses the queue:
// the test would see a stale FLUSHED count. fd 1 is left blocking by libuv in a child, so writeSync
// returns only when the line is in the socket.
const out = (line) => {
  const buf = Buffer.from(`${line}\n`);
  for (let at = 0; at < buf.length;) {
    try {
      at += fs.writeSync(1, buf, at);
    } catch (err) {
      if (err.code !== 'EAGAIN') throw err;
    }
  }
};
const PAGE = 4096;
const lossRandom = mulberry(cfg.lossSeed ?? 1);
let ops = 0;
let phase = 'start';

// ------------------------------------------------------------------ the file-layer hook

/** Per file: the size at its last datasync and the content (at that datasync) of pages written since. */
const files = new Map();
function tracked(f) {
  let s = files.get(f.path);
  if (!s) {
    // First operation on this file in this process: nothing was written through it before.
    s = { syncedSize: fs.statSync(f.path).size, dirty: new Map(), fd: undefined };
    files.set(f.path, s);
  }
  return s;
}

function rememberPages(f, position, length) {
  const s = tracked(f);
  if (!cfg.powerLoss || length === 0) return;
  s.fd ??= fs.openSync(f.path, 'r');
  for (let p = Math.floor(position / PAGE); p < Math.ceil((position + length) / PAGE); p++) {
    if (s.dirty.has(p)) continue;
    if (p * PAGE >= s.syncedSize) {
      s.dirty.set(p, null); // did not exist at the last datasync: reads zeros if lost
      continue;
    }
    const old = Buffer.alloc(PAGE);
    fs.readSync(s.fd, old, 0, PAGE, p * PAGE);
    s.dirty.set(p, old);
  }
}

function loseUnsyncedPages() {
  for (const [file, s] of files) {
    if (!fs.existsSync(file)) continue;
    const fd = fs.openSync(file, 'r+');
    try {
      let size = fs.fstatSync(fd).size;
      if (size > s.syncedSize && lossRandom() < 0.5) {
        fs.ftruncateSync(fd, s.syncedSize);
        size = s.syncedSize;
      }
      for (const [p, old] of s.dirty) {
        if (p * PAGE >= size || lossRandom() < 0.5) continue;
        const n = Math.min(PAGE, size - p * PAGE);
        fs.writeSync(fd, old ?? Buffer.alloc(PAGE), 0, n, p * PAGE);
      }
    } finally {
      fs.closeSync(fd);
    }
  }
}

async function crash(f, op, buf, position, original) {
  let torn = false;
  if (cfg.torn && op === 'write') {
    // Issue a prefix ending on a 4 KiB file boundary strictly inside the write, if there is one.
    const firstCut = Math.floor(position / PAGE) * PAGE + PAGE;
    const cuts = Math.floor((position + buf.length - 1 - firstCut) / PAGE) + 1;
    if (firstCut < position + buf.length && cuts > 0) {
      const cut = firstCut + Math.floor(lossRandom() * cuts) * PAGE;
      rememberPages(f, position, cut - position);
      await original.call(f, buf.subarray(0, cut - position), position);
      torn = true;
    }
  }
  if (cfg.powerLoss) loseUnsyncedPages();
  out(
    `CRASH ${ops} ${op} ${path.basename(f.path)} ${phase}${torn ? ' torn' : ''}${cfg.powerLoss ? ' power-loss' : ''}`,
  );
  process.kill(process.pid, 'SIGKILL');
  await new Promise(() => undefined); // never resumes
}

const { write, truncate, datasync } = NodeFile.prototype;
NodeFile.prototype.write = async function (buf, position) {
  if (++ops === cfg.killAtOp) await crash(this, 'write', buf, position, write);
  rememberPages(this, position, buf.length);
  return write.call(this, buf, position);
};
NodeFile.prototype.truncate = async function (size) {
  if (++ops === cfg.killAtOp) await crash(this, 'truncate');
  tracked(this);
  return truncate.call(this, size);
};
NodeFile.prototype.datasync = async function () {
  if (++ops === cfg.killAtOp) await crash(this, 'datasync');
  const s = tracked(this);
  await datasync.call(this);
  s.syncedSize = this.size();
  s.dirty.clear();
};

// ------------------------------------------------------------------ the work

if (cfg.mode === 'write') {
  phase = 'open';
  const disk = await VhdxFile.open(cfg.file, { writable: true });
  for (let i = 0; i < cfg.writes; i++) {
    phase = 'write';
    const w = planWrite(cfg.seed, i, disk.virtualSize);
    await disk.write(w.data, w.offset);
    if ((i + 1) % cfg.flushEvery === 0 || i === cfg.writes - 1) {
      phase = 'flush';
      out('F+');
      await disk.flush();
      out(`FLUSHED ${i + 1}`);
    }
  }
  phase = 'close';
  await disk.close();
} else if (cfg.mode === 'recover') {
  phase = 'replay';
  const disk = await VhdxFile.open(cfg.file, { writable: true });
  phase = 'close';
  await disk.close();
} else if (cfg.mode === 'merge') {
  phase = 'merge';
  await mergeIntoParent(cfg.file);
} else if (cfg.mode === 'repair') {
  phase = 'repair';
  const report = await checkVhdx(cfg.file, { repair: true });
  if (!report.ok) throw new Error(`repair left errors: ${JSON.stringify(report.errors)}`);
} else {
  throw new Error(`unknown mode ${cfg.mode}`);
}
for (const s of files.values()) if (s.fd !== undefined) fs.closeSync(s.fd);
out(`DONE ${ops}`);
