// Snapshot worker: a process that opens files through the engine's file layer, takes a storage snapshot
// of them, rewrites them (worker-plan.mjs), and is then killed with SIGKILL while the snapshot lives,
// by the test process or by itself just before its k-th operation reaches the file (for cow: after the
// old content went to the diff area, before the write is issued). It runs the built engine (a copy of
// dist/ named in the config), as a real host process would.
//
// Usage: node snapshot-worker.mjs '<json config>' (see WorkerConfig in worker.ts)
//
// Protocol on stdout, one line each, written with a blocking write(2) before the next step:
//   SNAP <id>        the snapshot is committed
//   OP <i>           operation i has completed
//   CRASH <i>        the worker kills itself instead of issuing operation i
//   DONE <stats>     every operation done; the snapshot's stats() as JSON (with hold: the worker waits)
import fs from 'node:fs';
import path from 'node:path';
import { setInterval } from 'node:timers';
import { pathToFileURL } from 'node:url';
import { planOp } from './worker-plan.mjs';

const cfg = JSON.parse(process.argv[2]);
const dist = (p) => pathToFileURL(path.join(cfg.dist, p)).href;
const { createProvider } = await import(dist('snapshot/index.js'));
const { NodeFile, addFileWriteInterceptor } = await import(dist('util/file.js'));

// Not process.stdout: towards a pipe it may queue in memory, and SIGKILL would lose the queue.
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

const die = (i) => async () => {
  out(`CRASH ${i}`);
  process.kill(process.pid, 'SIGKILL');
  await new Promise(() => undefined); // never resumes
};

const provider = createProvider(cfg.provider, cfg.extentSize ? { extentSize: cfg.extentSize } : {});
const handles = await Promise.all(cfg.files.map((f) => NodeFile.open(f, 'r+')));
const prepared = await provider.prepare(cfg.files, { diffAreaRoot: cfg.root });
const snap = await prepared.commit();
out(`SNAP ${snap.id}`);
for (let i = 0; i < cfg.ops; i++) {
  const op = planOp(cfg.seed, i, cfg.files.length, cfg.maxSize);
  const h = handles[op.file];
  // Registered after the snapshot's interceptor, so it runs once the old content is preserved.
  if (cfg.killAtOp === i) addFileWriteInterceptor(h.identity, { beforeWrite: die(i), beforeTruncate: die(i) });
  if (op.kind === 'write') await h.write(op.data, op.offset);
  else await h.truncate(op.size);
  out(`OP ${i}`);
}
out(`DONE ${JSON.stringify(snap.stats())}`);
if (cfg.hold) setInterval(() => undefined, 1 << 30);
else {
  await snap.release();
  for (const h of handles) await h.close();
}
