// Differential fuzz of the write commands on valid images: one random sequence of guest writes
// (qemu-io, the same on both sides) and qimg commands (snapshot -c/-a/-d, resize, convert,
// commit, rebase) run on one copy of an image, with qemu-img running the same commands on
// another. After every step both must agree: exit code, stdout and stderr (qemu-img's name
// swapped for qimg's), guest data, the snapshot table; and `qemu-img check` must find qimg's
// image clean (no errors, no leaks). The first disagreement ends the case and is returned.
//
// Both copies are named alike in sibling directories (a/img.qcow2, b/img.qcow2) and every
// command runs with the copy's directory as cwd, so file names in messages agree.

import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, renameSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { QIMG_BIN } from '../helpers.js';
import { Rng, caseSeed } from './mutate.js';

interface Out {
  status: number;
  stdout: string;
  stderr: string;
}

export interface OpsFinding {
  seed: number;
  index: number;
  /** The step that disagreed (1-based) and what it did. */
  step: number;
  op: string;
  what: string;
  /** Every step up to and including the failing one, to replay by hand. */
  log: string[];
  /** Set when the difference is a deliberate one (README.md), which ends the case. */
  known?: string;
}

const ENV = { ...process.env, LC_ALL: 'C', TZ: 'UTC' } as Record<string, string>;
delete ENV.NODE_EXTRA_CA_CERTS;

function exec(cmd: string, args: string[], cwd: string): Out {
  const r = spawnSync(cmd, args, { cwd, env: ENV, encoding: 'latin1', timeout: 60_000, killSignal: 'SIGKILL', maxBuffer: 1 << 26 });
  if (r.error) return { status: -1, stdout: '', stderr: String(r.error) };
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr + (r.signal ? `killed by ${r.signal}` : '') };
}

const qimgOut = (args: string[], cwd: string) => exec(process.execPath, [QIMG_BIN, ...args], cwd);
const qemuOut = (args: string[], cwd: string) => {
  const o = exec('qemu-img', args, cwd);
  return { status: o.status, stdout: o.stdout.replace(/qemu-img/g, 'qimg'), stderr: o.stderr.replace(/qemu-img/g, 'qimg') };
};

/** What a generated image looks like: options for `create -o`, and its size. */
interface Shape {
  v3: boolean;
  clusterSize: number;
  extendedL2: boolean;
  options: string;
  size: number;
}

function makeShape(rng: Rng): Shape {
  const v3 = rng.chance(0.8);
  const clusterSize = rng.pick([512, 4096, 4096, 16384, 65536, 65536]);
  const extendedL2 = v3 && clusterSize >= 16384 && rng.chance(0.3);
  const o = [`cluster_size=${clusterSize}`, `compat=${v3 ? '1.1' : '0.10'}`];
  if (v3) o.push(`refcount_bits=${rng.pick([1, 2, 4, 8, 16, 16, 16, 32, 64])}`);
  if (extendedL2) o.push('extended_l2=on');
  if (v3 && rng.chance(0.2)) o.push('lazy_refcounts=on');
  const size = (1 + rng.int(8)) * 512 * 1024 + (rng.chance(0.3) ? rng.int(64) * 512 : 0);
  return { v3, clusterSize, extendedL2, options: o.join(','), size };
}

/** A guest range for a write: cluster-sized and unaligned ones, sometimes crossing the end. */
function range(rng: Rng, size: number, cs: number): [number, number] {
  const unaligned = rng.chance(0.3);
  const off = unaligned ? rng.int(Math.max(1, size - 1)) : rng.int(Math.max(1, size / cs)) * cs;
  const len = unaligned ? 1 + rng.int(3 * cs) : (1 + rng.int(4)) * cs;
  return [off, Math.max(1, Math.min(len, size - off))];
}

/** One whole case: returns null when qimg and qemu-img agreed at every step. */
export function runOpsCase(dir: string, runSeed: number, index: number, steps: number, trace?: (op: string) => void): OpsFinding | null {
  const rng = new Rng(caseSeed(runSeed, index));
  const a = join(dir, 'a');
  const b = join(dir, 'b');
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(a, { recursive: true });
  mkdirSync(b, { recursive: true });
  const shape = makeShape(rng);
  let size = shape.size;
  const log: string[] = [`create -f qcow2 -o ${shape.options} img.qcow2 ${size}`];
  const fail = (step: number, op: string, what: string): OpsFinding => ({ seed: runSeed, index, step, op, what, log });

  // Both start from the same image, made by qemu-img; sometimes an overlay on a base with data.
  const backed = rng.chance(0.3);
  const baseCluster = rng.pick([512, 4096, 65536]);
  const baseWrites = [`write -P 0xb1 0 ${size >> 1}`, `write -z ${size >> 2} ${size >> 3}`];
  if (backed) log.push(`(img.qcow2 backed by base.qcow2: cluster_size=${baseCluster}, ${baseWrites.join(', ')})`);
  for (const d of [a, b]) {
    if (backed) {
      const o = exec('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${baseCluster}`, 'base.qcow2', String(size)], d);
      if (o.status !== 0) return fail(0, 'create base', `qemu-img create failed: ${o.stderr.trim()}`);
      exec('qemu-io', ['-f', 'qcow2', ...baseWrites.flatMap((w) => ['-c', w]), 'base.qcow2'], d);
    }
    const o = exec('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', shape.options, ...(backed ? ['-b', 'base.qcow2', '-F', 'qcow2'] : []), 'img.qcow2', String(size)], d);
    if (o.status !== 0) return fail(0, log[0]!, `qemu-img create failed: ${o.stderr.trim()}`);
  }
  const snapshots: string[] = [];
  let nextName = 1;
  let pattern = 1;

  for (let step = 1; step <= steps; step++) {
    const cs = shape.clusterSize;
    const r = rng.float();
    let op: string;
    // Commands both sides run: [qimg args, qemu-img args] (usually the same).
    let both: [string[], string[]] | null = null;
    let io: string | null = null;
    let extra: ((d: string) => string[]) | null = null;
    let replace = false;
    let raw: string | null = null;
    if (r < 0.3) {
      const [off, len] = range(rng, size, cs);
      const k = rng.int(10);
      io = k < 7 ? `write -P ${pattern++ & 0xff} ${off} ${len}` : k < 9 ? `write -z ${rng.chance(0.5) ? '-u ' : ''}${off} ${len}` : `discard ${off} ${len}`;
      op = `io ${io}`;
    } else if (r < 0.45) {
      const name = rng.chance(0.1) && snapshots.length ? rng.pick(snapshots) : `s${nextName++}`;
      both = [['snapshot', '-c', name, 'img.qcow2'], ['snapshot', '-c', name, 'img.qcow2']];
      op = `snapshot -c ${name}`;
    } else if (r < 0.55) {
      const name = snapshots.length && !rng.chance(0.1) ? rng.pick(snapshots) : 'nosuch';
      both = [['snapshot', '-a', name, 'img.qcow2'], ['snapshot', '-a', name, 'img.qcow2']];
      op = `snapshot -a ${name}`;
    } else if (r < 0.65) {
      const name = snapshots.length && !rng.chance(0.1) ? rng.pick(snapshots) : 'nosuch';
      both = [['snapshot', '-d', name, 'img.qcow2'], ['snapshot', '-d', name, 'img.qcow2']];
      op = `snapshot -d ${name}`;
    } else if (r < 0.75) {
      const grow = rng.chance(0.6);
      const delta = (1 + rng.int(8)) * (rng.chance(0.5) ? cs : 512);
      const shrink = !grow && rng.chance(0.8) ? ['--shrink'] : [];
      const arg = grow ? `+${delta}` : `-${Math.min(delta, size - 512)}`;
      both = [['resize', ...shrink, '-f', 'qcow2', 'img.qcow2', arg], ['resize', ...shrink, '-f', 'qcow2', 'img.qcow2', arg]];
      op = `resize ${[...shrink, arg].join(' ')}`;
    } else if (r < 0.78) {
      // Each side's own compressed copy becomes its image (snapshots and backing dropped), so
      // later steps write over compressed clusters qimg (or qemu-img) wrote.
      const o = ['-o', `cluster_size=${cs},compat=${shape.v3 ? '1.1' : '0.10'}${shape.extendedL2 ? ',extended_l2=on' : ''}`];
      both = [
        ['convert', '-f', 'qcow2', '-O', 'qcow2', '-c', ...o, 'img.qcow2', 'img.new'],
        ['convert', '-f', 'qcow2', '-O', 'qcow2', '-c', ...o, 'img.qcow2', 'img.new'],
      ];
      op = `convert -c ${o.join(' ')} img.qcow2 img.new; mv img.new img.qcow2`;
      replace = true;
    } else if (r < 0.85 && rng.chance(0.25)) {
      // To raw: the files themselves must be byte-identical.
      const l = snapshots.length && rng.chance(0.3) ? ['-l', rng.pick(snapshots)] : [];
      both = [
        ['convert', '-f', 'qcow2', '-O', 'raw', ...l, 'img.qcow2', 'out.raw'],
        ['convert', '-f', 'qcow2', '-O', 'raw', ...l, 'img.qcow2', 'out.raw'],
      ];
      op = `convert -O raw ${l.join(' ')} img.qcow2 out.raw`;
      raw = 'out.raw';
    } else if (r < 0.85) {
      const c = rng.chance(0.3) ? ['-c'] : [];
      const o = rng.chance(0.5) ? ['-o', `cluster_size=${rng.pick([512, 4096, 65536])}`] : [];
      const l = snapshots.length && rng.chance(0.3) ? ['-l', rng.pick(snapshots)] : [];
      both = [
        ['convert', '-f', 'qcow2', '-O', 'qcow2', ...c, ...o, ...l, 'img.qcow2', 'out.qcow2'],
        ['convert', '-f', 'qcow2', '-O', 'qcow2', ...c, ...o, ...l, 'img.qcow2', 'out.qcow2'],
      ];
      op = `convert ${[...c, ...o, ...l].join(' ')} img.qcow2 out.qcow2`;
      extra = () => ['out.qcow2'];
    } else if (r < 0.93) {
      // An external snapshot: an overlay on img, a write into it, then commit it back.
      const [off, len] = range(rng, size, cs);
      const drop = rng.chance(0.3) ? ['-d'] : [];
      const ovCluster = rng.pick([4096, 65536]);
      for (const d of [a, b]) {
        const o = exec('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${ovCluster}`, '-b', 'img.qcow2', '-F', 'qcow2', 'ov.qcow2'], d);
        if (o.status !== 0) return fail(step, 'create overlay', o.stderr.trim());
      }
      const w = `write -P ${pattern++ & 0xff} ${off} ${len}`;
      for (const d of [a, b]) exec('qemu-io', ['-f', 'qcow2', '-c', w, 'ov.qcow2'], d);
      if (rng.chance(0.35)) {
        // Two layers deep: ov2 on ov, committed through ov into img with -b.
        const [off2, len2] = range(rng, size, cs);
        const w2 = `write -P ${pattern++ & 0xff} ${off2} ${len2}`;
        for (const d of [a, b]) {
          const o = exec('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'ov.qcow2', '-F', 'qcow2', 'ov2.qcow2'], d);
          if (o.status !== 0) return fail(step, 'create overlay', o.stderr.trim());
          exec('qemu-io', ['-f', 'qcow2', '-c', w2, 'ov2.qcow2'], d);
        }
        both = [['commit', '-f', 'qcow2', '-b', 'img.qcow2', 'ov2.qcow2'], ['commit', '-f', 'qcow2', '-b', 'img.qcow2', 'ov2.qcow2']];
        op = `overlay ov.qcow2 (${w}), ov2.qcow2 on it (${w2}), then commit -b img.qcow2 ov2.qcow2`;
        extra = () => ['ov.qcow2', 'ov2.qcow2'];
      } else {
        both = [['commit', ...drop, '-f', 'qcow2', 'ov.qcow2'], ['commit', ...drop, '-f', 'qcow2', 'ov.qcow2']];
        op = `overlay ov.qcow2 (${w}) then commit ${drop.join(' ')}`;
        extra = () => ['ov.qcow2'];
      }
    } else {
      // An overlay rebased: flattened (-b ""), or onto a converted copy of its base (safe mode).
      const [off, len] = range(rng, size, cs);
      const flatten = rng.chance(0.5);
      const w = `write -P ${pattern++ & 0xff} ${off} ${len}`;
      const [off2, len2] = range(rng, size, cs);
      const w2 = `write -P ${pattern++ & 0xff} ${off2} ${len2}`;
      for (const d of [a, b]) {
        const o = exec('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'img.qcow2', '-F', 'qcow2', 'ov.qcow2'], d);
        if (o.status !== 0) return fail(step, 'create overlay', o.stderr.trim());
        exec('qemu-io', ['-f', 'qcow2', '-c', w, 'ov.qcow2'], d);
        if (!flatten) {
          exec('qemu-img', ['convert', '-f', 'qcow2', '-O', 'qcow2', 'img.qcow2', 'base2.qcow2'], d);
          exec('qemu-io', ['-f', 'qcow2', '-c', w2, 'base2.qcow2'], d);
        }
      }
      const unsafe = !flatten && rng.chance(0.25) ? ['-u'] : [];
      const target = flatten ? ['-b', ''] : [...unsafe, '-b', 'base2.qcow2', '-F', 'qcow2'];
      both = [['rebase', '-f', 'qcow2', ...target, 'ov.qcow2'], ['rebase', '-f', 'qcow2', ...target, 'ov.qcow2']];
      op = flatten ? `overlay ov.qcow2 (${w}) then rebase -b ""` : `overlay ov.qcow2 (${w}), base2 = img + (${w2}), then rebase ${unsafe.join('')} -b base2.qcow2`;
      extra = () => ['ov.qcow2'];
    }
    log.push(op);
    trace?.(op);

    if (io) {
      for (const d of [a, b]) {
        const o = exec('qemu-io', ['-f', 'qcow2', '-c', io, 'img.qcow2'], d);
        if (o.status !== 0 || /error|failed/i.test(o.stdout + o.stderr)) return fail(step, op, `qemu-io failed on ${d}: ${(o.stderr + o.stdout).trim()}`);
      }
    } else if (both) {
      const mine = qimgOut(both[0], a);
      const theirs = qemuOut(both[1], b);
      if (mine.status !== theirs.status || mine.stdout !== theirs.stdout || mine.stderr !== theirs.stderr) {
        // README: an apply nets the two trees' changes where QEMU adds one then subtracts the
        // other, so qimg reverts where a refcount passes its maximum only on the way.
        if (op.startsWith('snapshot -a') && mine.status === 0 && /Failed to load snapshot: Invalid argument/.test(theirs.stderr)) {
          return { ...fail(step, op, 'qemu-img overflowed a refcount on the way (deliberate difference)'), known: 'apply-net' };
        }
        return fail(step, op, `outputs differ:\n  qimg:     exit ${mine.status} ${JSON.stringify(mine.stdout)} ${JSON.stringify(mine.stderr)}\n  qemu-img: exit ${theirs.status} ${JSON.stringify(theirs.stdout)} ${JSON.stringify(theirs.stderr)}`);
      }
      if (mine.status === 0 && replace) {
        for (const d of [a, b]) renameSync(join(d, 'img.new'), join(d, 'img.qcow2'));
        snapshots.length = 0;
      }
      if (mine.status === 0) {
        if (op.startsWith('snapshot -c')) snapshots.push(both[0][2]!);
        if (op.startsWith('snapshot -d')) snapshots.splice(snapshots.indexOf(both[0][2]!), 1);
        size = virtualSize(b); // resize and snapshot -a change it
      }
    }

    if (raw) {
      const ea = existsSync(join(a, raw));
      if (ea !== existsSync(join(b, raw))) return fail(step, op, `${raw} exists only on the ${ea ? 'qimg' : 'qemu-img'} side`);
      if (ea && !readFileSync(join(a, raw)).equals(readFileSync(join(b, raw)))) return fail(step, op, `${raw} differs`);
      for (const d of [a, b]) rmSync(join(d, raw), { force: true });
    }
    for (const f of ['img.qcow2', ...(extra ? extra(a) : [])]) {
      if (!existsSync(join(a, f)) && !existsSync(join(b, f))) continue;
      const bad = agree(a, b, f) ?? (step === steps || rng.chance(0.25) ? readsAgree(a, b, f) : null);
      if (bad) return fail(step, op, `${f}: ${bad}`);
    }
    for (const f of extra ? extra(a) : []) for (const d of [a, b]) rmSync(join(d, f), { force: true });
    rmSync(join(a, 'base2.qcow2'), { force: true });
    rmSync(join(b, 'base2.qcow2'), { force: true });
  }
  // Every snapshot's data, read back through qemu-img on both sides.
  for (const s of snapshots) {
    for (const d of [a, b]) {
      const o = exec('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', '-l', `snapshot.name=${s}`, 'img.qcow2', `snap.raw`], d);
      if (o.status !== 0) return fail(steps, `read snapshot ${s}`, `qemu-img convert -l failed in ${d}: ${o.stderr.trim()}`);
    }
    if (!readFileSync(join(a, 'snap.raw')).equals(readFileSync(join(b, 'snap.raw')))) return fail(steps, `read snapshot ${s}`, `snapshot ${s} reads differently`);
  }
  rmSync(dir, { recursive: true, force: true });
  return null;
}

function virtualSize(d: string): number {
  const o = exec('qemu-img', ['info', '--output=json', '-f', 'qcow2', 'img.qcow2'], d);
  return (JSON.parse(o.stdout) as { 'virtual-size': number })['virtual-size'];
}

const DATE = /\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g;
const JSON_DATE = /"date-(sec|nsec)": \d+/g;

/**
 * The read commands on qimg's image: qimg and qemu-img must print the same for the same file
 * (snapshot dates masked: each side wrote its own). Null when they do, else what differs.
 */
function readsAgree(a: string, b: string, f: string): string | null {
  const mask = (o: Out): Out => ({ status: o.status, stdout: o.stdout.replace(DATE, 'DATE').replace(JSON_DATE, '"date-$1": 0'), stderr: o.stderr });
  const cmds = [
    ['info', '-f', 'qcow2', f],
    ['info', '--output=json', '-f', 'qcow2', f],
    ['info', '--backing-chain', '--output=json', '-f', 'qcow2', f],
    ['check', '--output=json', '-f', 'qcow2', f],
    ['check', '-f', 'qcow2', f],
    ['map', '--output=json', '-f', 'qcow2', f],
    ['snapshot', '-l', f],
    ['compare', '-f', 'qcow2', '-F', 'qcow2', f, join(b, f)],
  ];
  for (const args of cmds) {
    const mine = mask(qimgOut(args, a));
    const theirs = mask(qemuOut(args, a));
    if (mine.status !== theirs.status || mine.stdout !== theirs.stdout || mine.stderr !== theirs.stderr) {
      return `qimg ${args.join(' ')} differs from qemu-img:\n  qimg:     exit ${mine.status} ${JSON.stringify(mine.stdout)} ${JSON.stringify(mine.stderr)}\n  qemu-img: exit ${theirs.status} ${JSON.stringify(theirs.stdout)} ${JSON.stringify(theirs.stderr)}`;
    }
  }
  return null;
}

/** Null when a/f and b/f agree (and qimg's is clean), else what differs. */
function agree(a: string, b: string, f: string): string | null {
  if (existsSync(join(a, f)) !== existsSync(join(b, f))) return `exists only on the ${existsSync(join(a, f)) ? 'qimg' : 'qemu-img'} side`;
  const check = exec('qemu-img', ['check', '-f', 'qcow2', f], a);
  if (check.status !== 0 || !/No errors were found on the image/.test(check.stdout)) {
    return `qemu-img check of qimg's image: exit ${check.status}\n${check.stdout}${check.stderr}`;
  }
  const cmp = exec('qemu-img', ['compare', '-f', 'qcow2', '-F', 'qcow2', join(a, f), join(b, f)], a);
  if (cmp.status !== 0) return `guest data differs: ${cmp.stdout.trim()} ${cmp.stderr.trim()}`;
  const ia = info(a, f);
  const ib = info(b, f);
  if (ia !== ib) return `info differs:\n  qimg:     ${ia}\n  qemu-img: ${ib}`;
  return null;
}

/** What qemu-img info says that both must share: sizes, snapshots (less their dates), backing. */
function info(d: string, f: string): string {
  const o = exec('qemu-img', ['info', '--output=json', '-f', 'qcow2', f], d);
  if (o.status !== 0) return `info failed: ${o.stderr.trim()}`;
  const j = JSON.parse(o.stdout) as Record<string, unknown> & { snapshots?: Array<Record<string, unknown>>; 'format-specific'?: { data?: Record<string, unknown> } };
  const snaps = (j.snapshots ?? []).map((s) => ({ id: s.id, name: s.name, 'vm-state-size': s['vm-state-size'], 'vm-clock-sec': s['vm-clock-sec'], icount: s.icount }));
  const fs = j['format-specific']?.data ?? {};
  return JSON.stringify({
    v: j['virtual-size'],
    c: j['cluster-size'],
    backing: j['backing-filename'] ?? null,
    bfmt: j['backing-filename-format'] ?? null,
    snaps,
    compat: fs.compat,
    lazy: fs['lazy-refcounts'],
    rb: fs['refcount-bits'],
    ext: fs['extended-l2'],
    corrupt: fs.corrupt,
  });
}
