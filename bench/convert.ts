// Whole-command `convert` on a 1 GiB mixed-content image: qimg vs qemu-img, paired and interleaved,
// wall time and peak RSS, every qimg output checked by `qemu-img compare` and `qemu-img check`.
//
//   node dist/bench/convert.js [--runs N] [--root DIR] [--only q2q,r2q,q2qc,r2qc,q2r] [--cpu-prof] [--json]
//
// The source is generated once into /tmp/qimg-bench-cache (never committed) from a seeded PRNG:
// incompressible random regions, text-like regions (compress ~3x), zero regions and holes, in
// sizes from 512 B to 8 MiB at 512-byte (not cluster) alignment. The same guest content exists
// as a raw file (zero regions written out as zero bytes, holes left sparse) and as a qcow2
// (made by `qemu-img convert`, then the zero regions written with `qemu-io write -z`, half of
// them over clusters that held data, so the qcow2 holds data, zero-flag and unallocated clusters).

import { closeSync, existsSync, ftruncateSync, mkdtempSync, openSync, readFileSync, renameSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
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
  prng,
  qimgRoot,
  renderProfile,
  run,
  settleFreedMemory,
  syncAll,
  syncFile,
  table,
  timedRun,
  type BigBenchOptions,
  type RatioStats,
} from './common.js';

/** The aim: qimg convert no slower than qemu-img convert (median per-round wall-time ratio). */
export const CONVERT_AIM_RATIO = 1.0;
const DEFAULT_RUNS = 5;
const SIZE = 1024 * 1024 * 1024;
/** Bump when the generator changes, so a cached source from an older generator is rebuilt. */
const GEN_VERSION = 'convert-src v1 seed 0x51a6e';
const SEED = 0x51a6e;

type Kind = 'random' | 'text' | 'zero' | 'hole';
interface Region {
  kind: Kind;
  off: number;
  len: number;
  /** For zero regions: whether the qcow2 held data there before `write -z`. */
  overData: boolean;
}

interface Case {
  key: string;
  label: string;
  src: 'raw' | 'qcow2';
  out: 'raw' | 'qcow2';
  compress: boolean;
}

const CASES: Case[] = [
  { key: 'q2q', label: 'qcow2 -> qcow2', src: 'qcow2', out: 'qcow2', compress: false },
  { key: 'r2q', label: 'raw -> qcow2', src: 'raw', out: 'qcow2', compress: false },
  { key: 'q2qc', label: 'qcow2 -> qcow2 -c', src: 'qcow2', out: 'qcow2', compress: true },
  { key: 'r2qc', label: 'raw -> qcow2 -c', src: 'raw', out: 'qcow2', compress: true },
  { key: 'q2r', label: 'qcow2 -> raw', src: 'qcow2', out: 'raw', compress: false },
];

interface Sources {
  raw: string;
  qcow2: string;
  summary: string;
}

/** Region layout: kinds weighted random 30%, text 30%, zero 15%, hole 25%; sizes log-uniform 512 B..8 MiB. */
function layout(): Region[] {
  const rng = prng(SEED);
  const out: Region[] = [];
  let off = 0;
  while (off < SIZE) {
    const u = rng();
    const kind: Kind = u < 0.3 ? 'random' : u < 0.6 ? 'text' : u < 0.75 ? 'zero' : 'hole';
    const k = 3 + Math.floor(rng() * 12);
    const len = Math.min(512 * (1 + Math.floor(rng() * 2 ** k)), SIZE - off);
    out.push({ kind, off, len, overData: rng() < 0.5 });
    off += len;
  }
  return out;
}

/** 4 MiB of English-like text over a small vocabulary; regions take slices of it at random offsets. */
function textPool(rng: () => number): Buffer {
  const letters = 'etaoinshrdlcumwfgypbvkjxqz';
  const words: string[] = [];
  for (let i = 0; i < 400; i++) {
    let w = '';
    const n = 2 + Math.floor(rng() * 8);
    for (let j = 0; j < n; j++) w += letters[Math.floor(rng() ** 2 * letters.length)];
    words.push(w);
  }
  const parts: string[] = [];
  let len = 0;
  let line = 0;
  while (len < 4 * 1024 * 1024) {
    // Zipf-ish word choice, like real prose.
    const w = words[Math.floor(rng() ** 3 * words.length)]!;
    const sep = line > 60 + rng() * 20 ? '\n' : ' ';
    line = sep === '\n' ? 0 : line + w.length + 1;
    parts.push(w, sep);
    len += w.length + 1;
  }
  return Buffer.from(parts.join(''), 'latin1');
}

function fillRandom(buf: Buffer, rng: () => number): void {
  const words = new Uint32Array(buf.buffer, buf.byteOffset, buf.length >>> 2);
  for (let i = 0; i < words.length; i++) words[i] = (rng() * 4294967296) >>> 0;
}

/** Builds (or reuses from the cache) the raw and qcow2 sources with identical guest content. */
function ensureSources(log: (s: string) => void): Sources {
  ensureDir(CACHE_DIR);
  const raw = join(CACHE_DIR, 'convert-src.raw');
  const qcow2 = join(CACHE_DIR, 'convert-src.qcow2');
  const stamp = join(CACHE_DIR, 'convert-src.stamp');
  const regions = layout();
  const bytes = (k: Kind): number => regions.filter((r) => r.kind === k).reduce((s, r) => s + r.len, 0);
  const summary =
    `1 GiB guest, ${regions.length} regions: random ${(bytes('random') / 2 ** 20).toFixed(0)} MiB, ` +
    `text ${(bytes('text') / 2 ** 20).toFixed(0)} MiB, zero ${(bytes('zero') / 2 ** 20).toFixed(0)} MiB ` +
    `(written as zeros), holes ${(bytes('hole') / 2 ** 20).toFixed(0)} MiB`;
  if (existsSync(stamp) && existsSync(raw) && existsSync(qcow2) && readFileSync(stamp, 'utf8') === GEN_VERSION) {
    log(`convert: reusing cached sources in ${CACHE_DIR} (delete convert-src.* there to rebuild)\n`);
    return { raw, qcow2, summary };
  }
  log(`convert: generating 1 GiB sources in ${CACHE_DIR} (cached for later runs; about a minute)\n`);
  rmSync(stamp, { force: true });
  const tmpRaw = raw + '.tmp';
  const tmpQcow2 = qcow2 + '.tmp';
  const rng = prng(SEED ^ 0x9e3779b9);
  const pool = textPool(rng);
  const buf = Buffer.alloc(8 * 1024 * 1024 + 512);
  // Pass 1: data everywhere the qcow2 should hold data before the zero writes.
  const fd = openSync(tmpRaw, 'w');
  try {
    ftruncateSync(fd, SIZE);
    for (const r of regions) {
      if (r.kind === 'hole' || (r.kind === 'zero' && !r.overData)) continue;
      const chunk = buf.subarray(0, r.len);
      if (r.kind === 'text') {
        // Pieces of at most 1 MiB from random places in the pool (regions can be larger than it).
        for (let at = 0; at < r.len; at += 1 << 20) {
          const n = Math.min(1 << 20, r.len - at);
          const from = Math.floor(rng() * (pool.length - n));
          pool.copy(chunk, at, from, from + n);
        }
      } else {
        fillRandom(chunk, rng);
      }
      writeSync(fd, chunk, 0, r.len, r.off);
    }
  } finally {
    closeSync(fd);
  }
  mustRun('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', tmpRaw, tmpQcow2], 'qemu-img convert of the generated raw');
  // Pass 2: the zero regions, as zero-flag writes in the qcow2 and zero bytes in the raw.
  const zeros = regions.filter((r) => r.kind === 'zero');
  for (let i = 0; i < zeros.length; i += 100) {
    const cmds = zeros.slice(i, i + 100).flatMap((r) => ['-c', `write -z ${r.off} ${r.len}`]);
    mustRun('qemu-io', ['-f', 'qcow2', ...cmds, tmpQcow2], 'qemu-io write -z');
  }
  const fd2 = openSync(tmpRaw, 'r+');
  try {
    buf.fill(0);
    for (const r of zeros) writeSync(fd2, buf, 0, r.len, r.off);
  } finally {
    closeSync(fd2);
  }
  mustRun('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', tmpRaw, tmpQcow2], 'qemu-img compare of the generated sources');
  mustRun('qemu-img', ['check', tmpQcow2], 'qemu-img check of the generated qcow2');
  renameSync(tmpRaw, raw);
  renameSync(tmpQcow2, qcow2);
  writeFileSync(stamp, GEN_VERSION);
  return { raw, qcow2, summary };
}

interface Cmd {
  c: Case;
  tool: 'qimg' | 'qemu-img';
  file: string;
  args: string[];
  out: string;
}

export interface Failure {
  case: string;
  round: number;
  what: string;
  reproduce: string;
}

export interface CaseResult {
  key: string;
  label: string;
  qimgMedianMs: number;
  qemuMedianMs: number;
  wall: RatioStats;
  qimgRssKiB: number | null;
  qemuRssKiB: number | null;
  rss: RatioStats;
  /** Allocated bytes of the output (st_blocks), qimg / qemu-img, median over rounds. */
  allocRatio: number | null;
  qemuAllocMiB: number | null;
}

export interface ConvertReport {
  runs: number;
  machine: string;
  source: string;
  results: CaseResult[];
  failures: Failure[];
  aimMet: boolean;
}

function argsFor(c: Case, src: string, out: string): string[] {
  return ['convert', '-f', c.src, '-O', c.out, ...(c.compress ? ['-c'] : []), src, out];
}

/** Verifies one qimg output against its source; returns the problems found (empty when clean). */
function verify(c: Case, src: string, out: string): string[] {
  const problems: string[] = [];
  const cmp = run('qemu-img', ['compare', '-f', c.src, '-F', c.out, src, out]);
  if (cmp.status !== 0) problems.push(`qemu-img compare exit ${cmp.status}: ${(cmp.stdout + cmp.stderr).trim().split('\n').slice(0, 3).join(' / ')}`);
  if (c.out === 'qcow2') {
    const chk = run('qemu-img', ['check', out]);
    if (chk.status !== 0) problems.push(`qemu-img check exit ${chk.status}: ${(chk.stdout + chk.stderr).trim().split('\n').slice(0, 6).join(' / ')}`);
  }
  return problems;
}

export function runConvertBench(opts: BigBenchOptions, log: (s: string) => void): ConvertReport {
  if (!hasQemuImg()) throw new Error('convert: qemu-img is not on the PATH; this bench compares against it');
  const root = qimgRoot(opts);
  const qimgBin = join(root, 'bin', 'qimg.js');
  const gnuTime = hasGnuTime();
  if (!gnuTime) log(`convert: /usr/bin/time not available, skipping peak RSS\n`);
  const srcs = ensureSources(log);
  const cases = opts.only ? CASES.filter((c) => opts.only!.includes(c.key) || opts.only!.includes(c.label)) : CASES;
  if (cases.length === 0) throw new Error(`convert: --only matched no case (keys: ${CASES.map((c) => c.key).join(',')})`);
  const work = mkdtempSync(join(CACHE_DIR, '..', 'qimg-bench-convert-'));
  const cmds: Cmd[] = [];
  for (const c of cases) {
    const src = c.src === 'raw' ? srcs.raw : srcs.qcow2;
    for (const tool of ['qimg', 'qemu-img'] as const) {
      const out = join(work, `${c.key}-${tool}.${c.out}`);
      cmds.push({ c, tool, out, file: tool === 'qimg' ? qimgBin : 'qemu-img', args: argsFor(c, src, out) });
    }
  }
  log(`convert: ${opts.runs} paired rounds of ${cmds.length} commands; ${machineNote()}\n  source: ${srcs.summary}\n  timing ${qimgBin}\n`);
  // Warm the page cache with both sources, so neither tool's first run pays for reading them.
  mustRun('sh', ['-c', `cat '${srcs.raw}' '${srcs.qcow2}' > /dev/null`], 'warming the page cache');

  const ms: (number | null)[][] = cmds.map(() => []);
  const rss: (number | null)[][] = cmds.map(() => []);
  const alloc: (number | null)[][] = cmds.map(() => []);
  const failures: Failure[] = [];
  for (let round = 0; round < opts.runs; round++) {
    for (let k = 0; k < cmds.length; k++) {
      const i = (k + round) % cmds.length;
      const cmd = cmds[i]!;
      rmSync(cmd.out, { force: true });
      syncAll();
      settleFreedMemory();
      const r = timedRun(cmd.file, cmd.args, { gnuTime, scratch: work });
      const shown = `${cmd.tool === 'qimg' ? qimgBin : 'qemu-img'} ${cmd.args.join(' ')}`;
      let problems: string[] = [];
      if (r.status !== 0) problems.push(`exit ${r.status}: ${r.stderr.trim().split('\n').slice(0, 3).join(' / ')}`);
      else if (cmd.tool === 'qimg') problems = verify(cmd.c, cmd.c.src === 'raw' ? srcs.raw : srcs.qcow2, cmd.out);
      if (problems.length) {
        for (const p of problems) {
          failures.push({ case: cmd.c.label, round, what: `${cmd.tool}: ${p}`, reproduce: shown });
          log(`\n!!! FAILURE ${cmd.c.label} (${cmd.tool}, round ${round + 1}): ${p}\n!!!   reproduce: ${shown}\n`);
        }
        ms[i]!.push(null);
        rss[i]!.push(null);
        alloc[i]!.push(null);
        // Keep the first bad output for a post-mortem.
        const keep = join(work, `FAILED-${cmd.c.key}-${cmd.tool}-round${round + 1}.${cmd.c.out}`);
        if (existsSync(cmd.out) && !existsSync(keep)) renameSync(cmd.out, keep);
        continue;
      }
      syncFile(cmd.out); // untimed: do not let one tool's dirty pages slow the next command
      ms[i]!.push(r.ms);
      rss[i]!.push(r.rssKiB);
      alloc[i]!.push(statSync(cmd.out).blocks * 512);
      rmSync(cmd.out, { force: true });
    }
    log(`  round ${round + 1}/${opts.runs} done\n`);
  }

  const results: CaseResult[] = cases.map((c, ci) => {
    const a = ci * 2;
    const b = ci * 2 + 1;
    const okMs = (xs: (number | null)[]) => xs.filter((x): x is number => x !== null);
    const rssA = okMs(rss[a]!);
    const rssB = okMs(rss[b]!);
    const al = pairedRatio(alloc[a]!, alloc[b]!);
    const qa = okMs(alloc[b]!);
    return {
      key: c.key,
      label: c.label,
      qimgMedianMs: median(okMs(ms[a]!)),
      qemuMedianMs: median(okMs(ms[b]!)),
      wall: pairedRatio(ms[a]!, ms[b]!),
      qimgRssKiB: rssA.length ? median(rssA) : null,
      qemuRssKiB: rssB.length ? median(rssB) : null,
      rss: pairedRatio(rss[a]!, rss[b]!),
      allocRatio: al.n ? al.median : null,
      qemuAllocMiB: qa.length ? median(qa) / 2 ** 20 : null,
    };
  });

  if (failures.length === 0) rmSync(work, { recursive: true, force: true });
  else log(`convert: failed outputs kept in ${work}\n`);
  const aimMet = results.every((r) => r.wall.n > 0 && r.wall.median <= CONVERT_AIM_RATIO) && failures.length === 0;
  return { runs: opts.runs, machine: machineNote(), source: srcs.summary, results, failures, aimMet };
}

export function renderConvertReport(rep: ConvertReport): string {
  const rows = [['case', 'qimg s', 'qemu-img s', 'wall x qemu-img (p25-p75)', 'RSS MiB qimg/qemu', 'RSS x qemu-img', 'output alloc x', 'qemu-img out MiB']];
  for (const r of rep.results) {
    rows.push([
      r.label,
      fmt(r.qimgMedianMs / 1000, 2),
      fmt(r.qemuMedianMs / 1000, 2),
      fmtRatio(r.wall),
      `${mib(r.qimgRssKiB)}/${mib(r.qemuRssKiB)}`,
      r.rss.n ? fmt(r.rss.median, 2) : '-',
      fmt(r.allocRatio, 3),
      fmt(r.qemuAllocMiB, 0),
    ]);
  }
  const lines = [
    `convert, ${rep.runs} paired rounds; ${rep.machine}`,
    `source: ${rep.source}`,
    'Ratios are medians of per-round ratios qimg / qemu-img (same round, interleaved); seconds are medians.',
    '',
    table(rows),
    '',
    `Aim: every case no slower than qemu-img (wall ratio <= ${CONVERT_AIM_RATIO}): ${rep.aimMet ? 'MET' : 'NOT MET'}` +
      (rep.failures.length ? ` — ${rep.failures.length} CORRECTNESS FAILURE(S), see above` : ''),
  ];
  for (const f of rep.failures) lines.push(`  FAILED ${f.case} round ${f.round + 1}: ${f.what}\n    reproduce: ${f.reproduce}`);
  return lines.join('\n') + '\n';
}

export function convertMain(argv: string[]): void {
  const opts = parseBigBenchArgs('convert', argv, DEFAULT_RUNS);
  const log = (s: string) => {
    if (!opts.json) process.stderr.write(s);
  };
  const rep = runConvertBench(opts, log);
  process.stdout.write(opts.json ? JSON.stringify(rep, null, 2) + '\n' : renderConvertReport(rep));
  if (opts.cpuProf) {
    // One profiled qimg run per case that missed the aim (every selected case with --only).
    const root = qimgRoot(opts);
    const srcs = ensureSources(() => {});
    const scratch = mkdtempSync(join(CACHE_DIR, '..', 'qimg-bench-prof-'));
    try {
      for (const r of rep.results) {
        if (!opts.only && r.wall.median <= CONVERT_AIM_RATIO) continue;
        const c = CASES.find((x) => x.key === r.key)!;
        const out = join(scratch, `out.${c.out}`);
        const p = cpuProfile(root, argsFor(c, c.src === 'raw' ? srcs.raw : srcs.qcow2, out), scratch);
        process.stdout.write('\n' + renderProfile(`qimg ${c.label}: top functions by self time`, p));
        rmSync(out, { force: true });
      }
    } finally {
      rmSync(scratch, { recursive: true, force: true });
    }
  }
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  convertMain(process.argv.slice(2));
}
