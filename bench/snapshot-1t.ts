// `snapshot -c/-a/-d` on a 1 TiB image with preallocated metadata: qimg vs qemu-img on identical
// copies, paired and interleaved, wall time and peak RSS, every qimg result checked by qemu-img.
//
//   node dist/bench/snapshot-1t.js [--runs N] [--root DIR] [--only c,a,d] [--cpu-prof] [--json]
//
// The base image is `qemu-img create -f qcow2 -o preallocation=metadata BASE 1T`: sparse, but
// with every L2 table (128 MiB) and refcount block (32 MiB) written and 16 Mi data clusters
// allocated, so each snapshot operation has to walk and update ~16.8 M refcounts. It is made
// once and cached in /tmp/qimg-bench-cache with a copy that already holds one snapshot (made
// by qemu-img) for -a and -d; delete snapshot-1t-* there to rebuild. Before every timed run
// the input is copied with `cp --sparse=always` and synced; neither is timed.

import { existsSync, mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import {
  CACHE_DIR,
  cpuProfile,
  ensureDir,
  fmt,
  fmtRatio,
  hasGnuTime,
  hasQemuImg,
  machineNote,
  median,
  mib,
  mustRun,
  pairedRatio,
  parseBigBenchArgs,
  qimgRoot,
  renderProfile,
  run,
  syncFile,
  table,
  timedRun,
  type BigBenchOptions,
  type RatioStats,
} from './common.js';

/** The aim: each snapshot operation in at most a tenth of qemu-img's wall time. */
export const SNAPSHOT_AIM_RATIO = 0.1;
const DEFAULT_RUNS = 3;
const GEN_VERSION = 'snapshot-1t v1: qemu-img create -f qcow2 -o preallocation=metadata 1T; snapshot s0 by qemu-img';

interface Op {
  key: 'c' | 'a' | 'd';
  label: string;
  input: 'base' | 'withSnap';
  args: (img: string) => string[];
  /** Snapshot names the image must hold afterwards. */
  expect: string[];
}

const OPS: Op[] = [
  { key: 'c', label: 'snapshot -c', input: 'base', args: (img) => ['snapshot', '-c', 's1', img], expect: ['s1'] },
  { key: 'a', label: 'snapshot -a', input: 'withSnap', args: (img) => ['snapshot', '-a', 's0', img], expect: ['s0'] },
  { key: 'd', label: 'snapshot -d', input: 'withSnap', args: (img) => ['snapshot', '-d', 's0', img], expect: [] },
];

interface Inputs {
  base: string;
  withSnap: string;
}

function ensureInputs(log: (s: string) => void): Inputs {
  ensureDir(CACHE_DIR);
  const base = join(CACHE_DIR, 'snapshot-1t-base.qcow2');
  const withSnap = join(CACHE_DIR, 'snapshot-1t-snap.qcow2');
  const stamp = join(CACHE_DIR, 'snapshot-1t.stamp');
  if (existsSync(stamp) && existsSync(base) && existsSync(withSnap) && readFileSync(stamp, 'utf8') === GEN_VERSION) {
    log(`snapshot: reusing cached 1 TiB images in ${CACHE_DIR} (delete snapshot-1t-* there to rebuild)\n`);
    return { base, withSnap };
  }
  log(`snapshot: creating the 1 TiB preallocated-metadata image in ${CACHE_DIR} (~160 MiB on disk, cached for later runs; ~15-60 s)\n`);
  rmSync(stamp, { force: true });
  const tmp = base + '.tmp';
  mustRun('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', tmp, '1T'], 'qemu-img create 1T');
  renameSync(tmp, base);
  const tmp2 = withSnap + '.tmp';
  mustRun('cp', ['--sparse=always', base, tmp2], 'cp of the base image');
  mustRun('qemu-img', ['snapshot', '-c', 's0', tmp2], 'qemu-img snapshot -c s0');
  renameSync(tmp2, withSnap);
  writeFileSync(stamp, GEN_VERSION);
  return { base, withSnap };
}

/** What is wrong with the image after a qimg run (empty when `qemu-img check` is clean and the snapshots are as expected). */
function verify(img: string, expect: string[]): string[] {
  const problems: string[] = [];
  const chk = run('qemu-img', ['check', img]);
  const text = (chk.stdout + chk.stderr).trim();
  if (chk.status !== 0 || /leak|error|corrupt/i.test(text.replace('No errors were found on the image.', ''))) {
    problems.push(`qemu-img check exit ${chk.status}: ${text.split('\n').slice(0, 6).join(' / ')}`);
  }
  const info = run('qemu-img', ['info', '--output=json', img]);
  if (info.status !== 0) problems.push(`qemu-img info exit ${info.status}: ${info.stderr.trim()}`);
  else {
    const names = ((JSON.parse(info.stdout) as { snapshots?: { name: string }[] }).snapshots ?? []).map((s) => s.name);
    if (names.join(',') !== expect.join(',')) problems.push(`snapshots are [${names.join(', ')}], expected [${expect.join(', ')}]`);
  }
  return problems;
}

export interface Failure {
  op: string;
  round: number;
  what: string;
  reproduce: string;
}

export interface OpResult {
  key: string;
  label: string;
  qimgMedianMs: number;
  qemuMedianMs: number;
  wall: RatioStats;
  qimgRssKiB: number | null;
  qemuRssKiB: number | null;
}

export interface SnapshotReport {
  runs: number;
  machine: string;
  results: OpResult[];
  failures: Failure[];
  aimMet: boolean;
}

interface Cmd {
  op: Op;
  tool: 'qimg' | 'qemu-img';
  img: string;
}

export function runSnapshotBench(opts: BigBenchOptions, log: (s: string) => void): SnapshotReport {
  if (!hasQemuImg()) throw new Error('snapshot: qemu-img is not on the PATH; this bench compares against it');
  const root = qimgRoot(opts);
  const qimgBin = join(root, 'bin', 'qimg.js');
  const gnuTime = hasGnuTime();
  if (!gnuTime) log('snapshot: /usr/bin/time not available, skipping peak RSS\n');
  const inputs = ensureInputs(log);
  const ops = opts.only ? OPS.filter((o) => opts.only!.includes(o.key) || opts.only!.includes(o.label)) : OPS;
  if (ops.length === 0) throw new Error('snapshot: --only matched no operation (keys: c,a,d)');
  const work = mkdtempSync(join(CACHE_DIR, '..', 'qimg-bench-snapshot-'));
  const cmds: Cmd[] = ops.flatMap((op) => (['qimg', 'qemu-img'] as const).map((tool) => ({ op, tool, img: join(work, `${op.key}-${tool}.qcow2`) })));
  log(`snapshot: ${opts.runs} paired rounds of ${cmds.length} commands; ${machineNote()}\n  timing ${qimgBin}\n`);

  const ms: (number | null)[][] = cmds.map(() => []);
  const rss: (number | null)[][] = cmds.map(() => []);
  const failures: Failure[] = [];
  for (let round = 0; round < opts.runs; round++) {
    for (let k = 0; k < cmds.length; k++) {
      const i = (k + round) % cmds.length;
      const cmd = cmds[i]!;
      rmSync(cmd.img, { force: true });
      mustRun('cp', ['--sparse=always', inputs[cmd.op.input], cmd.img], 'cp of the input image');
      syncFile(cmd.img);
      const args = cmd.op.args(cmd.img);
      const [file, argv] = cmd.tool === 'qimg' ? [qimgBin, args] : ['qemu-img', args];
      const r = timedRun(file, argv, { gnuTime, scratch: work });
      const shown = `cp --sparse=always ${inputs[cmd.op.input]} ${cmd.img} && ${cmd.tool === 'qimg' ? qimgBin : 'qemu-img'} ${args.join(' ')}`;
      let problems: string[] = [];
      if (r.status !== 0) problems.push(`exit ${r.status}: ${r.stderr.trim().split('\n').slice(0, 3).join(' / ')}`);
      else if (cmd.tool === 'qimg') problems = verify(cmd.img, cmd.op.expect);
      if (problems.length) {
        for (const p of problems) {
          failures.push({ op: cmd.op.label, round, what: `${cmd.tool}: ${p}`, reproduce: shown });
          log(`\n!!! FAILURE ${cmd.op.label} (${cmd.tool}, round ${round + 1}): ${p}\n!!!   reproduce: ${shown}\n`);
        }
        ms[i]!.push(null);
        rss[i]!.push(null);
        const keep = join(work, `FAILED-${cmd.op.key}-${cmd.tool}-round${round + 1}.qcow2`);
        if (!existsSync(keep)) renameSync(cmd.img, keep);
        continue;
      }
      ms[i]!.push(r.ms);
      rss[i]!.push(r.rssKiB);
      rmSync(cmd.img, { force: true });
    }
    log(`  round ${round + 1}/${opts.runs} done\n`);
  }

  const ok = (xs: (number | null)[]) => xs.filter((x): x is number => x !== null);
  const results: OpResult[] = ops.map((op, oi) => {
    const a = oi * 2;
    const b = oi * 2 + 1;
    const ra = ok(rss[a]!);
    const rb = ok(rss[b]!);
    return {
      key: op.key,
      label: op.label,
      qimgMedianMs: median(ok(ms[a]!)),
      qemuMedianMs: median(ok(ms[b]!)),
      wall: pairedRatio(ms[a]!, ms[b]!),
      qimgRssKiB: ra.length ? median(ra) : null,
      qemuRssKiB: rb.length ? median(rb) : null,
    };
  });
  if (failures.length === 0) rmSync(work, { recursive: true, force: true });
  else log(`snapshot: failed images kept in ${work}\n`);
  const aimMet = failures.length === 0 && results.every((r) => r.wall.n > 0 && r.wall.median <= SNAPSHOT_AIM_RATIO);
  return { runs: opts.runs, machine: machineNote(), results, failures, aimMet };
}

export function renderSnapshotReport(rep: SnapshotReport): string {
  const rows = [['operation (1 TiB, prealloc metadata)', 'qimg s', 'qemu-img s', 'wall x qemu-img (p25-p75)', 'peak RSS MiB qimg', 'qemu-img']];
  for (const r of rep.results) {
    rows.push([r.label, fmt(r.qimgMedianMs / 1000, 2), fmt(r.qemuMedianMs / 1000, 2), fmtRatio(r.wall, 3), mib(r.qimgRssKiB), mib(r.qemuRssKiB)]);
  }
  const lines = [
    `snapshot on a 1 TiB image, ${rep.runs} paired rounds; ${rep.machine}`,
    'Ratios are medians of per-round ratios qimg / qemu-img on identical fresh copies; seconds are medians.',
    '',
    table(rows),
    '',
    `Aim: each operation at most ${SNAPSHOT_AIM_RATIO}x qemu-img's wall time: ${rep.aimMet ? 'MET' : 'NOT MET'}` +
      (rep.failures.length ? ` — ${rep.failures.length} CORRECTNESS FAILURE(S), see above` : ''),
  ];
  for (const f of rep.failures) lines.push(`  FAILED ${f.op} round ${f.round + 1}: ${f.what}\n    reproduce: ${f.reproduce}`);
  return lines.join('\n') + '\n';
}

export function snapshotMain(argv: string[]): void {
  const opts = parseBigBenchArgs('snapshot', argv, DEFAULT_RUNS);
  const log = (s: string) => {
    if (!opts.json) process.stderr.write(s);
  };
  const rep = runSnapshotBench(opts, log);
  process.stdout.write(opts.json ? JSON.stringify(rep, null, 2) + '\n' : renderSnapshotReport(rep));
  if (opts.cpuProf) {
    const root = qimgRoot(opts);
    const inputs = ensureInputs(() => {});
    const scratch = mkdtempSync(join(CACHE_DIR, '..', 'qimg-bench-prof-'));
    try {
      for (const r of rep.results) {
        if (!opts.only && r.wall.median <= SNAPSHOT_AIM_RATIO) continue;
        const op = OPS.find((o) => o.key === r.key)!;
        const img = join(scratch, 'img.qcow2');
        mustRun('cp', ['--sparse=always', inputs[op.input], img], 'cp of the input image');
        syncFile(img);
        const p = cpuProfile(root, op.args(img), scratch);
        process.stdout.write('\n' + renderProfile(`qimg ${op.label}: top functions by self time`, p));
        rmSync(img, { force: true });
      }
    } finally {
      rmSync(scratch, { recursive: true, force: true });
    }
  }
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  snapshotMain(process.argv.slice(2));
}
