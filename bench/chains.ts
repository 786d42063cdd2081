// Whole-command bench: `qimg commit` and `qimg rebase` (safe) against qemu-img on a 1 GiB chain
// generated in /tmp (never committed): base (128 MiB data) <- mid (128 MiB) <- top (250 MiB).
// Paired runs on fresh copies, alternating which tool goes first; wall time ratio (qimg/qemu)
// and peak RSS from /usr/bin/time -f %M. Every qimg result is checked against qemu-img's with
// `qemu-img compare` and `qemu-img check`; a mismatch is printed loudly and not timed.
//
//   node dist/bench/chains.js [--runs N] [--root DIR] [--vs DIR]
//
// --root DIR times another tree's qimg (a private built copy, so rebuilds of dist/ cannot break
// a run); --vs DIR also times a second tree in the same rounds (e.g. a build of the previous
// commit) and adds the median per-round ratio qimg / that tree's qimg: a before/after that the
// machine's load cancels out of, as far as pairing can.

import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
let argv: string[] = process.argv.slice(2);
function arg(name: string): string | undefined {
  const i = argv.indexOf(name);
  return i >= 0 ? argv[i + 1] : undefined;
}
let QIMG = join(ROOT, 'bin', 'qimg.js');
let VS: string | null = null;
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
  /** user + system CPU seconds: less at the mercy of other processes than wall time. */
  cpu: number;
}

/** [bin, ...args] -> the bin run as an executable, through its shebang, as an installed qimg runs. */
function binCommand(argv: string[]): [string, string[]] {
  return [argv[0]!, argv.slice(1)];
}

function timed(cmd: string, args: string[]): Timed {
  const t0 = process.hrtime.bigint();
  const r = spawnSync('/usr/bin/time', ['-f', '%M %U %S', cmd, ...args], { encoding: 'utf8' });
  const wall = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr}`);
  const lines = r.stderr.trim().split('\n');
  const [rss, user, sys] = lines[lines.length - 1]!.split(' ').map(Number) as [number, number, number];
  return { wall, rssKiB: rss, cpu: user + sys };
}

const CASES: Record<string, { qimg: (d: string, bin?: string) => string[]; qemu: (d: string) => string[]; check: string[] }> = {
  'commit top -> mid': {
    qimg: (d, bin = QIMG) => [bin, 'commit', '-q', join(d, 'top.qcow2')],
    qemu: (d) => ['commit', '-q', join(d, 'top.qcow2')],
    check: ['top.qcow2', 'mid.qcow2'],
  },
  'rebase top -b base (safe)': {
    qimg: (d, bin = QIMG) => [bin, 'rebase', '-b', 'base.qcow2', '-F', 'qcow2', join(d, 'top.qcow2')],
    qemu: (d) => ['rebase', '-b', 'base.qcow2', '-F', 'qcow2', join(d, 'top.qcow2')],
    check: ['top.qcow2'],
  },
  'rebase top -b "" (flatten)': {
    qimg: (d, bin = QIMG) => [bin, 'rebase', '-b', '', join(d, 'top.qcow2')],
    qemu: (d) => ['rebase', '-b', '', join(d, 'top.qcow2')],
    check: ['top.qcow2'],
  },
};

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
}

/** `node dist/bench/run.js chains [--runs N] [--root DIR] [--vs DIR]`. */
export function chainsMain(args: string[]): void {
  argv = args;
  QIMG = join(arg('--root') ?? ROOT, 'bin', 'qimg.js');
  VS = arg('--vs') !== undefined ? join(arg('--vs')!, 'bin', 'qimg.js') : null;
  const runs = Number(arg('--runs') ?? 3);
  generate();
  console.log(`chains bench: 1 GiB chain, ${runs} paired runs per case (load ${(spawnSync('cat', ['/proc/loadavg'], { encoding: 'utf8' }).stdout.split(' ')[0])})`);
  const vsCols = VS ? [' x --vs tree (median of pairs) |', '---|'] : ['', ''];
  console.log(`| case | qimg s (median) | qemu-img s (median) | ratio (median of pairs) |${vsCols[0]} CPU s qimg / qemu-img | qimg RSS MiB | qemu-img RSS MiB |`);
  console.log(`|---|---|---|---|${vsCols[1]}---|---|---|`);
  for (const [label, c] of Object.entries(CASES)) {
    const mine: Timed[] = [];
    const theirs: Timed[] = [];
    const ratios: number[] = [];
    const vsRatios: number[] = [];
    for (let r = 0; r < runs; r++) {
      const a = fresh('a');
      const b = fresh('b');
      const v = VS ? fresh('v') : null;
      // Each round runs every command once, in an order rotated by one per round.
      const jobs: Array<() => void> = [];
      let m: Timed | null = null;
      let q: Timed | null = null;
      let o: Timed | null = null;
      jobs.push(() => (m = timed(...binCommand(c.qimg(a)))));
      jobs.push(() => (q = timed('qemu-img', c.qemu(b))));
      if (v) jobs.push(() => (o = timed(...binCommand(c.qimg(v, VS!)))));
      for (let k = 0; k < jobs.length; k++) jobs[(k + r) % jobs.length]!();
      for (const f of c.check) {
        const cmp = spawnSync('qemu-img', ['compare', join(a, f), join(b, f)], { encoding: 'utf8' });
        const chk = spawnSync('qemu-img', ['check', join(a, f)], { encoding: 'utf8' });
        if (cmp.status !== 0 || chk.status !== 0) {
          console.log(`!!! ${label}: ${f} differs from qemu-img's result or fails check: ${cmp.stdout}${chk.stdout}`);
          process.exitCode = 1;
          return;
        }
      }
      mine.push(m!);
      theirs.push(q!);
      ratios.push(m!.wall / q!.wall);
      if (o) vsRatios.push(m!.wall / (o as Timed).wall);
    }
    const mw = median(mine.map((x) => x.wall));
    const qw = median(theirs.map((x) => x.wall));
    const vsCol = VS ? ` ${median(vsRatios).toFixed(2)} |` : '';
    console.log(
      `| ${label} | ${mw.toFixed(2)} | ${qw.toFixed(2)} | ${median(ratios).toFixed(2)} |${vsCol} ${median(mine.map((x) => x.cpu)).toFixed(2)} / ${median(theirs.map((x) => x.cpu)).toFixed(2)} | ${(Math.max(...mine.map((x) => x.rssKiB)) / 1024).toFixed(0)} | ${(Math.max(...theirs.map((x) => x.rssKiB)) / 1024).toFixed(0)} |`,
    );
  }
  for (const d of ['a', 'b', 'v']) rmSync(join(DIR, d), { recursive: true, force: true });
}

if (process.argv[1] !== undefined && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) chainsMain(process.argv.slice(2));
