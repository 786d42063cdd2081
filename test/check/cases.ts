// Shared by the check-vs-qemu-img test files (split so the runner can spread them over
// processes): the base geometries, made once per process, their damaged copies and comparisons.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { mustQemuImg, qemuImg, tmpDir, type RunResult } from '../helpers.js';
import { asQimg, qimgCheck } from './cli.js';
import { DAMAGES, makeBase, Poker, type BaseSpec } from './poke.js';

const dir = tmpDir('qimg-check-');

/** A file in this process's scratch directory. */
export function scratch(name: string): string {
  return join(dir, name);
}

export const BASES: BaseSpec[] = [
  { name: 'c64k', opts: 'cluster_size=65536' },
  { name: 'c4k-rc8', opts: 'cluster_size=4096,refcount_bits=8' },
  { name: 'extl2', opts: 'cluster_size=65536,extended_l2=on' },
  { name: 'v2', opts: 'compat=0.10,cluster_size=16384' },
  { name: 'c512-rc64', opts: 'cluster_size=512,refcount_bits=64' },
  { name: 'rc1', opts: 'cluster_size=65536,refcount_bits=1', compressed: false, snapshot: false },
];

export function same(got: RunResult, want: RunResult, label: string): void {
  assert.is(got.stderr, want.stderr, `${label}: stderr`);
  assert.is(got.stdout, want.stdout, `${label}: stdout`);
  assert.is(got.status, want.status, `${label}: exit code`);
}

/**
 * Poked image bytes through both tools' `check ARGS`, each on a fresh copy at `file`: the same
 * output and exit code; with `-r` (unless `after` is false) qemu-img check of the two results
 * must agree too, and with `bytes` the results must be equal files. Returns qimg's result file.
 */
export async function checkBoth(file: string, name: string, b: Uint8Array, args: string[], opts: { bytes?: boolean; after?: boolean } = {}): Promise<Buffer> {
  writeFileSync(file, b);
  const want = asQimg(qemuImg(['check', ...args, file]));
  const theirs = qemuImg(['check', file]);
  const theirBytes = readFileSync(file);
  writeFileSync(file, b);
  same(await qimgCheck([...args, file]), want, `${name} (${args.join(' ') || 'check'})`);
  if ((opts.after ?? true) && args.includes('-r')) same(qemuImg(['check', file]), theirs, `${name}: qemu-img check after ${args.join(' ')}`);
  if (opts.bytes) assert.ok(readFileSync(file).equals(theirBytes), `${name}: file after ${args.join(' ')}`);
  return readFileSync(file);
}

export interface Made {
  spec: BaseSpec;
  path: string;
}

const made = new Map<string, Made>();
/** The bases at these indices of BASES, each made once per process. */
export function bases(indices: number[]): Made[] {
  return indices.map((i) => {
    const spec = BASES[i]!;
    let m = made.get(spec.name);
    if (!m) {
      m = { spec, path: join(dir, `${spec.name}.qcow2`) };
      makeBase(m.path, spec);
      made.set(spec.name, m);
    }
    return m;
  });
}

export function damaged(b: Made, di: number): string | null {
  const d = DAMAGES[di]!;
  const p = Poker.load(b.path);
  try {
    d.poke(p);
  } catch {
    return null; // e.g. a refcount of 2 on a 1-bit image
  }
  const out = join(dir, `${b.spec.name}-d${di}.qcow2`);
  p.save(out);
  return out;
}

export function applicable(b: Made, di: number): boolean {
  const d = DAMAGES[di]!;
  if (d.needs?.includes('snapshot') && b.spec.snapshot === false) return false;
  if (d.needs?.includes('compressed') && b.spec.compressed === false) return false;
  return true;
}

/** Raw images of snapshot 1 of each base, made once. */
const snapRaw = new Map<string, string>();
function snapshotRaw(path: string, out: string): string {
  mustQemuImg(['convert', '-U', '-O', 'raw', '-l', 'snapshot.id=1', path, out]);
  return out;
}

/** Every layer of `path` holds the same guest data as in the pre-damage base (qemu-img compare is sparse-aware). */
export function assertLayersEqual(b: Made, path: string, label: string): void {
  const act = qemuImg(['compare', '-U', b.path, path]);
  assert.is(act.status, 0, `${label}: active layer: ${act.stdout}${act.stderr}`);
  if (b.spec.snapshot === false) return;
  let base = snapRaw.get(b.path);
  if (!base) snapRaw.set(b.path, (base = snapshotRaw(b.path, join(dir, `${b.spec.name}-s1.raw`))));
  const mine = snapshotRaw(path, join(dir, 'repaired-s1.raw'));
  const sn = qemuImg(['compare', '-f', 'raw', '-F', 'raw', base, mine]);
  assert.is(sn.status, 0, `${label}: snapshot 1: ${sn.stdout}${sn.stderr}`);
}

/** The findings test for each base: every damage kind, human and JSON, same as qemu-img. */
export function findingsTests(list: Made[]): void {
  for (const b of list) {
    test(`check findings match qemu-img on ${b.spec.name} (${DAMAGES.length} damage kinds, human + json)`, async () => {
      for (let di = 0; di < DAMAGES.length; di++) {
        if (!applicable(b, di)) continue;
        const f = damaged(b, di);
        if (!f) continue;
        const label = `${b.spec.name} / ${DAMAGES[di]!.name}`;
        same(await qimgCheck([f]), asQimg(qemuImg(['check', f])), label);
        same(await qimgCheck(['--output=json', f]), asQimg(qemuImg(['check', '--output=json', f])), `${label} (json)`);
      }
    });
  }
}
