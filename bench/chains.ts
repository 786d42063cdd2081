// Whole-command bench: `qimg commit` and `qimg rebase` (safe) against qemu-img on a 1 GiB chain
// generated in /tmp (never committed): base (128 MiB data) <- mid (128 MiB) <- top (250 MiB).
// Paired runs on fresh copies, alternating which tool goes first; wall time ratio (qimg/qemu)
// and peak RSS from /usr/bin/time -f %M. Every qimg result is checked against qemu-img's with
// `qemu-img compare` and `qemu-img check`; a mismatch is printed loudly and not timed.
//
//   node dist/bench/chains.js [--runs N]

import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const QIMG = join(ROOT, 'bin', 'qimg.js');
const DIR = join(tmpdir(), 'qimg-bench-chains');
const MiB = 1024 * 1024;

function sh(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 1 << 26 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

/** Writes `total` bytes of pattern `p` as 1 MiB pieces spread with `stride` from `start`. */
function fill(img: string, p: number, start: number, stride: number, total: number): void {
  const cmds: string[] = [];
  for (let off = start, done = 0; done < total; off += stride, done += MiB) cmds.push('-c', `write -P ${p} ${off} 1M`);
  for (let i = 0; i < cmds.length; i += 200) sh('qemu-io', [...cmds.slice(i, i + 200), img]);
}

function generate(): void {
  if (existsSync(join(DIR, 'pristine', 'top.qcow2'))) return;
  const d = join(DIR, 'pristine');
  mkdirSync(d, { recursive: true });
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', join(d, 'base.qcow2'), '1G']);
  fill(join(d, 'base.qcow2'), 1, 0, 8 * MiB, 128 * MiB);
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', join(d, 'mid.qcow2')]);
  fill(join(d, 'mid.qcow2'), 2, 2 * MiB, 8 * MiB, 128 * MiB);
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', join(d, 'top.qcow2')]);
  fill(join(d, 'top.qcow2'), 3, 4 * MiB, 4 * MiB, 250 * MiB);
}

function fresh(name: string): string {
  const d = join(DIR, name);
  rmSync(d, { recursive: true, force: true });
  sh('cp', ['-r', '--sparse=always', join(DIR, 'pristine'), d]);
  sh('sync', []);
  return d;
}

interface Timed {
  wall: number;
  rssKiB: number;
}

function timed(cmd: string, args: string[]): Timed {
  const t0 = process.hrtime.bigint();
  const r = spawnSync('/usr/bin/time', ['-f', '%M', cmd, ...args], { encoding: 'utf8' });
  const wall = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr}`);
  const lines = r.stderr.trim().split('\n');
  return { wall, rssKiB: Number(lines[lines.length - 1]) };
}

const CASES: Record<string, { qimg: (d: string) => string[]; qemu: (d: string) => string[]; check: string[] }> = {
  'commit top -> mid': {
    qimg: (d) => [QIMG, 'commit', '-q', join(d, 'top.qcow2')],
    qemu: (d) => ['commit', '-q', join(d, 'top.qcow2')],
    check: ['top.qcow2', 'mid.qcow2'],
  },
  'rebase top -b base (safe)': {
    qimg: (d) => [QIMG, 'rebase', '-b', 'base.qcow2', '-F', 'qcow2', join(d, 'top.qcow2')],
    qemu: (d) => ['rebase', '-b', 'base.qcow2', '-F', 'qcow2', join(d, 'top.qcow2')],
    check: ['top.qcow2'],
  },
  'rebase top -b "" (flatten)': {
    qimg: (d) => [QIMG, 'rebase', '-b', '', join(d, 'top.qcow2')],
    qemu: (d) => ['rebase', '-b', '', join(d, 'top.qcow2')],
    check: ['top.qcow2'],
  },
};

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
}

function main(): void {
  const i = process.argv.indexOf('--runs');
  const runs = i > 0 ? Number(process.argv[i + 1]) : 3;
  generate();
  console.log(`chains bench: 1 GiB chain, ${runs} paired runs per case (load ${(spawnSync('cat', ['/proc/loadavg'], { encoding: 'utf8' }).stdout.split(' ')[0])})`);
  console.log('| case | qimg s (median) | qemu-img s (median) | ratio (median of pairs) | qimg RSS MiB | qemu-img RSS MiB |');
  console.log('|---|---|---|---|---|---|');
  for (const [label, c] of Object.entries(CASES)) {
    const mine: Timed[] = [];
    const theirs: Timed[] = [];
    const ratios: number[] = [];
    for (let r = 0; r < runs; r++) {
      const a = fresh('a');
      const b = fresh('b');
      let m: Timed;
      let q: Timed;
      if (r % 2 === 0) {
        m = timed(process.execPath, c.qimg(a));
        q = timed('qemu-img', c.qemu(b));
      } else {
        q = timed('qemu-img', c.qemu(b));
        m = timed(process.execPath, c.qimg(a));
      }
      for (const f of c.check) {
        const cmp = spawnSync('qemu-img', ['compare', join(a, f), join(b, f)], { encoding: 'utf8' });
        const chk = spawnSync('qemu-img', ['check', join(a, f)], { encoding: 'utf8' });
        if (cmp.status !== 0 || chk.status !== 0) {
          console.log(`!!! ${label}: ${f} differs from qemu-img's result or fails check: ${cmp.stdout}${chk.stdout}`);
          process.exitCode = 1;
          return;
        }
      }
      mine.push(m);
      theirs.push(q);
      ratios.push(m.wall / q.wall);
    }
    const mw = median(mine.map((x) => x.wall));
    const qw = median(theirs.map((x) => x.wall));
    console.log(
      `| ${label} | ${mw.toFixed(2)} | ${qw.toFixed(2)} | ${median(ratios).toFixed(2)} | ${(Math.max(...mine.map((x) => x.rssKiB)) / 1024).toFixed(0)} | ${(Math.max(...theirs.map((x) => x.rssKiB)) / 1024).toFixed(0)} |`,
    );
  }
  rmSync(join(DIR, 'a'), { recursive: true, force: true });
  rmSync(join(DIR, 'b'), { recursive: true, force: true });
}

main();
