// qimg check against qemu-img check 7.2: build-then-poke images of several geometries, every
// damage kind, the same stdout / stderr / JSON / exit code; repairs compared with qemu-img's on
// an identical copy (output and resulting bytes), then the repaired image is clean for qemu-img
// and every layer's data is unchanged.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { mustQemuImg, qemuImg, tmpDir, type RunResult } from '../helpers.js';
import { asQimg, qimgCheck } from './cli.js';
import { DAMAGES, makeBase, Poker, type BaseSpec } from './poke.js';

const dir = tmpDir('qimg-check-');

const BASES: BaseSpec[] = [
  { name: 'c64k', opts: 'cluster_size=65536' },
  { name: 'c4k-rc8', opts: 'cluster_size=4096,refcount_bits=8' },
  { name: 'extl2', opts: 'cluster_size=65536,extended_l2=on' },
  { name: 'v2', opts: 'compat=0.10,cluster_size=16384' },
  { name: 'c512-rc64', opts: 'cluster_size=512,refcount_bits=64' },
  { name: 'rc1', opts: 'cluster_size=65536,refcount_bits=1', compressed: false, snapshot: false },
];

function same(got: RunResult, want: RunResult, label: string): void {
  assert.is(got.stderr, want.stderr, `${label}: stderr`);
  assert.is(got.stdout, want.stdout, `${label}: stdout`);
  assert.is(got.status, want.status, `${label}: exit code`);
}

interface Made {
  spec: BaseSpec;
  path: string;
}
const bases: Made[] = BASES.map((spec) => {
  const path = join(dir, `${spec.name}.qcow2`);
  makeBase(path, spec);
  return { spec, path };
});

function damaged(b: Made, di: number): string | null {
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

function applicable(b: Made, di: number): boolean {
  const d = DAMAGES[di]!;
  if (d.needs?.includes('snapshot') && b.spec.snapshot === false) return false;
  if (d.needs?.includes('compressed') && b.spec.compressed === false) return false;
  return true;
}

for (const b of bases) {
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

test('quiet, -f, raw and missing files behave like qemu-img', async () => {
  const b = bases[0]!;
  const leak = damaged(b, 1)!;
  same(await qimgCheck(['-q', leak]), asQimg(qemuImg(['check', '-q', leak])), '-q');
  same(await qimgCheck(['-f', 'qcow2', leak]), asQimg(qemuImg(['check', '-f', 'qcow2', leak])), '-f qcow2');
  const raw = join(dir, 'plain.raw');
  writeFileSync(raw, new Uint8Array(65536));
  same(await qimgCheck([raw]), asQimg(qemuImg(['check', raw])), 'raw');
  same(await qimgCheck(['-f', 'qcow2', raw]), asQimg(qemuImg(['check', '-f', 'qcow2', raw])), 'raw as qcow2');
  same(await qimgCheck(['-f', 'raw', b.path]), asQimg(qemuImg(['check', '-f', 'raw', b.path])), 'qcow2 as raw');
  const missing = join(dir, 'nope.qcow2');
  same(await qimgCheck([missing]), asQimg(qemuImg(['check', missing])), 'missing');
});

/** Raw images of snapshot 1 of each base, made once. */
const snapRaw = new Map<string, string>();
function snapshotRaw(path: string, out: string): string {
  mustQemuImg(['convert', '-U', '-O', 'raw', '-l', 'snapshot.id=1', path, out]);
  return out;
}

/** Every layer of `path` holds the same guest data as in the pre-damage base (qemu-img compare is sparse-aware). */
function assertLayersEqual(b: Made, path: string, label: string): void {
  const act = qemuImg(['compare', '-U', b.path, path]);
  assert.is(act.status, 0, `${label}: active layer: ${act.stdout}${act.stderr}`);
  if (b.spec.snapshot === false) return;
  let base = snapRaw.get(b.path);
  if (!base) snapRaw.set(b.path, (base = snapshotRaw(b.path, join(dir, `${b.spec.name}-s1.raw`))));
  const mine = snapshotRaw(path, join(dir, 'repaired-s1.raw'));
  const sn = qemuImg(['compare', '-f', 'raw', '-F', 'raw', base, mine]);
  assert.is(sn.status, 0, `${label}: snapshot 1: ${sn.stdout}${sn.stderr}`);
}

for (const b of bases.slice(0, 3)) {
  test(`repairs (-r leaks, -r all) match qemu-img on ${b.spec.name}; repaired image clean with data unchanged`, async () => {
    for (let di = 0; di < DAMAGES.length; di++) {
      const d = DAMAGES[di]!;
      if (!d.refcountOnly || !applicable(b, di)) continue;
      const f = damaged(b, di);
      if (!f) continue;
      for (const mode of ['leaks', 'all']) {
        const label = `${b.spec.name} / ${d.name} / -r ${mode}`;
        const theirs = join(dir, 'theirs.qcow2');
        const mine = join(dir, 'mine.qcow2');
        copyFileSync(f, theirs);
        copyFileSync(f, mine);
        const want = asQimg(qemuImg(['check', '-r', mode, theirs]), theirs, mine);
        same(await qimgCheck(['-r', mode, mine]), want, label);
        assert.ok(readFileSync(mine).equals(readFileSync(theirs)), `${label}: same bytes as qemu-img's repair`);
        const after = qemuImg(['check', mine]);
        if (want.status === 0) {
          assert.is(after.status, 0, `${label}: qemu-img check after repair: ${after.stdout}${after.stderr}`);
          if (mode === 'all') assertLayersEqual(b, mine, label);
        }
      }
    }
  });
}

test('rebuild avoids clusters the old refcount table still names (where qemu-img fails its overlap check)', async () => {
  const b = bases[0]!;
  for (const name of ['refcount table entry unaligned', 'refcount table entry reserved bits']) {
    const f = damaged(b, DAMAGES.findIndex((d) => d.name === name))!;
    const r = await qimgCheck(['-r', 'all', f]);
    assert.is(r.status, 0, `${name}: ${r.stdout}${r.stderr}`);
    assert.ok(r.stdout.startsWith('The following inconsistencies were found and repaired:\n'), r.stdout);
    assert.is(qemuImg(['check', f]).status, 0, `${name}: qemu-img check after repair`);
    assertLayersEqual(b, f, name);
  }
});

test.run();
