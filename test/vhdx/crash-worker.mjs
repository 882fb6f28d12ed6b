// Crash-test worker: writes through the engine (or merges) until the parent kills it with SIGKILL.
// It runs the built code (dist/), as a real process would. Protocol on stdout, one line each:
//   FLUSHED <n>   writes 0..n-1 are covered by a completed flush
//   DONE          finished without being killed
import { mergeIntoParent } from '../../dist/formats/vhdx/merge.js';
import { VhdxFile } from '../../dist/formats/vhdx/vhdx.js';
import { planWrite } from './crash-plan.mjs';

const [mode, file, seedText, countText] = process.argv.slice(2);
const seed = Number(seedText);

if (mode === 'write') {
  const disk = await VhdxFile.open(file, { writable: true });
  const count = Number(countText);
  for (let i = 0; i < count; i++) {
    const w = planWrite(seed, i, disk.virtualSize);
    await disk.write(w.data, w.offset);
    if (i % 4 === 3) {
      await disk.flush();
      process.stdout.write(`FLUSHED ${i + 1}\n`);
    }
  }
  await disk.close();
} else if (mode === 'merge') {
  await mergeIntoParent(file);
}
process.stdout.write('DONE\n');
