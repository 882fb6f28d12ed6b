// Change-tracking crash worker: opens a tracked disk writable (ChangeTracker.attach), performs the seeded
// operations of crash-plan.mjs through the built engine (dist/), and reports on stdout, one line each:
//   READY               the disk and its tracker are open
//   OP <i>              write / write-zeroes / trim i completed
//   FLUSHED <i>         flush i completed
//   SEALED <i> <id>     seal i returned <id> (the content at that id: every operation before i)
//   END <fileops>       closed cleanly; <fileops> file operations were made in all
// The test kills it with SIGKILL from outside, or (with KILL_AT_FILE_OP=k) it kills itself just before
// its k-th file write, truncate or datasync: inside seals, coarse-map updates and log commits exactly.
// Output to a pipe is synchronous on Linux, so a reported line is out before the next operation starts.
import { VhdxFile } from '../../dist/formats/vhdx/vhdx.js';
import { ChangeTracker } from '../../dist/tracking/tracker.js';
import { NodeFile } from '../../dist/util/file.js';
import { opData, planOp } from './crash-plan.mjs';

const [file, seedText, countText] = process.argv.slice(2);
const seed = Number(seedText);
const count = Number(countText);
const killAt = Number(process.env.KILL_AT_FILE_OP ?? 0);

let fileOps = 0;
for (const name of ['write', 'truncate', 'datasync']) {
  const original = NodeFile.prototype[name];
  NodeFile.prototype[name] = function (...args) {
    if (++fileOps === killAt) process.kill(process.pid, 'SIGKILL');
    return original.apply(this, args);
  };
}

const say = (line) => process.stdout.write(line + '\n');

const disk = await VhdxFile.open(file, { writable: true });
const tracker = await ChangeTracker.attach(disk, { writable: true });
if (!tracker) throw new Error(`${file} is not tracked`);
say('READY');
for (let i = 0; i < count; i++) {
  const op = planOp(seed, i, disk.virtualSize);
  switch (op.kind) {
    case 'write':
      await disk.write(opData(op), op.offset);
      say(`OP ${i}`);
      break;
    case 'zero':
      await disk.writeZeroes(op.offset, op.length);
      say(`OP ${i}`);
      break;
    case 'trim':
      await disk.trim(op.offset, op.length);
      say(`OP ${i}`);
      break;
    case 'flush':
      await disk.flush();
      say(`FLUSHED ${i}`);
      break;
    case 'seal':
      say(`SEALED ${i} ${await tracker.seal()}`);
      break;
  }
}
await disk.close();
say(`END ${fileOps}`);
