/** `tidemark guest-image build [DIR]`: the small Linux guest the tests, the quickstart and the docs boot. */
import path from 'node:path';
import { Command } from 'commander';
import { buildGuestImage, defaultImageDir } from '../guest-image/index.js';
import { formatSize } from '../util/size.js';
import { printJson, println } from './output.js';

type Run = (fn: () => Promise<number | void>) => Promise<void>;

export function guestImageCommand(run: Run): Command {
  const gi = new Command('guest-image').description('a small Linux guest built from Debian packages, without root');
  gi.command('build')
    .description('build (or reuse) the guest image: vmlinux, initrd.img, manifest.json')
    .argument('[dir]', `output folder (default ${defaultImageDir()})`)
    .option(
      '--cache <dir>',
      'cache of downloaded and unpacked packages (default: $TIDEMARK_CACHE/guest-image or ~/.cache/tidemark/guest-image)',
    )
    .option('--force', 'rebuild even when the image is up to date')
    .option('--json', 'print the manifest as JSON')
    .action((dir: string | undefined, o) =>
      run(async () => {
        const r = await buildGuestImage({
          outDir: dir === undefined ? undefined : path.resolve(dir),
          cacheDir: o.cache === undefined ? undefined : path.resolve(o.cache),
          force: !!o.force,
          log: o.json ? undefined : (line) => process.stderr.write(`guest-image: ${line}\n`),
        });
        if (o.json)
          return printJson({
            dir: r.dir,
            vmlinux: r.vmlinux,
            initrd: r.initrd,
            upToDate: r.upToDate,
            manifest: r.manifest,
          });
        const m = r.manifest;
        println(`${r.upToDate ? 'up to date' : 'built'}: ${r.dir}`);
        println(
          `  vmlinux     ${r.vmlinux} (${formatSize(m.kernel.bytes)}, Linux ${m.kernel.release}, ${m.kernel.package} ${m.kernel.version})`,
        );
        println(`  initrd.img  ${r.initrd} (${formatSize(m.initrd.bytes)}, ${m.initrd.entries} entries)`);
        println(`  manifest    ${path.join(r.dir, 'manifest.json')}`);
        println(`  packages    ${m.packages.map((p) => `${p.name} ${p.version}`).join(', ')}`);
        println(`  modules     ${m.modules.map((x) => x.name).join(', ')}`);
        println(`  workloads   ${m.workloads.join(', ')} (kernel command line: ${m.cmdline})`);
        println(`  boot it     tidemark vm create NAME --image ${r.dir} --new-disk scsi0-0:1G`);
      }),
    );
  return gi;
}
