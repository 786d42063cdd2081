// `qimg convert -O raw` against `qemu-img convert -O raw`: same bytes (active layer and every
// internal snapshot, in every -l form), output no less sparse, and qemu-img's refusals.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { FIXTURES, qemuImg, tmpDir, type RunResult } from '../helpers.js';
import { allocatedBytes, fixtureKinds, generatedKinds, pool, qimgA, type Kind, type SnapshotRef } from '../oracle.js';

const out = tmpDir('qimg-convert-');
let seq = 0;

interface Job {
  k: Kind;
  /** The -l argument, if any. */
  snapshot?: string;
  ref: string;
  refResult: RunResult;
  dst: string;
  got?: RunResult;
}

/**
 * Every -l form for the first snapshot of an image with several snapshots, one form (in turn)
 * for the others (each qimg run costs ~0.15 s of CPU).
 */
function selectors(snaps: SnapshotRef[]): string[] {
  const forms = (s: SnapshotRef): string[] => [
    `snapshot.name=${s.name}`,
    `snapshot.id=${s.id}`,
    s.name,
    s.id,
    `snapshot.id=${s.id},snapshot.name=${s.name}`,
  ];
  return snaps.flatMap((s, i) => (i === 0 && snaps.length >= 3 ? forms(s) : [forms(s)[(i + 1) % 5]!]));
}

function plan(k: Kind): Job[] {
  const jobs: Job[] = [];
  for (const snapshot of [undefined, ...selectors(k.snapshots)]) {
    const n = seq++;
    const ref = join(out, `ref${n}.raw`);
    const dst = join(out, `got${n}.raw`);
    const l = snapshot === undefined ? [] : ['-l', snapshot];
    const refResult = qemuImg(['convert', '-U', ...l, '-O', 'raw', basename(k.path), ref], {}, dirname(k.path));
    jobs.push({ k, snapshot, ref, refResult, dst });
  }
  return jobs;
}

const jobs: Job[] = [...fixtureKinds(), ...generatedKinds()].flatMap(plan);

test('convert: run every qimg convert (4 at a time)', async () => {
  await pool(
    jobs.map((j) => async () => {
      const l = j.snapshot === undefined ? [] : ['-l', j.snapshot];
      j.got = await qimgA(['convert', ...l, '-O', 'raw', basename(j.k.path), j.dst], { cwd: dirname(j.k.path) });
    }),
    4,
  );
});

function firstDiff(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

for (const j of jobs) {
  const label = `${j.k.name}${j.snapshot === undefined ? '' : ` -l '${j.snapshot}'`}`;
  test(`convert: ${label}`, () => {
    const g = j.got!;
    assert.ok(g, 'not run');
    if (j.refResult.status !== 0) {
      // qemu-img refuses (LUKS without its secret): so must qimg, without creating the output.
      assert.is(g.status, j.refResult.status, `${label}: exit code; qemu-img said ${j.refResult.stderr}; qimg said ${g.stderr}`);
      assert.ok(g.stderr.startsWith('qimg: ') && g.stderr.trimEnd().split('\n').length === 1, `${label}: stderr ${g.stderr}`);
      assert.not.ok(existsSync(j.dst), `${label}: output file created`);
      return;
    }
    assert.is(g.status, 0, `${label}: ${g.stderr}`);
    assert.is(g.stdout, '', `${label}: stdout`);
    const want = readFileSync(j.ref);
    const got = readFileSync(j.dst);
    assert.is(got.length, want.length, `${label}: size`);
    const d = firstDiff(got, want);
    assert.is(d, -1, `${label}: first differing byte at ${d}: got ${got[d]}, want ${want[d]}`);
    const a = allocatedBytes(j.dst);
    const b = allocatedBytes(j.ref);
    assert.ok(a <= b + 4096, `${label}: output allocates ${a} bytes, qemu-img's ${b}`);
  });
}

test('convert: unknown snapshot -> exit 1, one line, no output file', async () => {
  const sels = ['nosuch', 'snapshot.name=nosuch', 'snapshot.id=99', '99', 'snapshot.id=1,snapshot.name=after-update'];
  const dsts = sels.map((_, i) => join(out, `missing${i}.raw`));
  // The oracle first: qemu-img refuses each of these the same way.
  sels.forEach((s, i) => {
    const r = qemuImg(['convert', '-l', s, '-O', 'raw', 'demo.qcow2', dsts[i]!], {}, FIXTURES);
    assert.is(r.status, 1, `qemu-img -l ${s}`);
    assert.is(r.stderr, "qemu-img: Failed to load snapshot: Can't find snapshot\n", `qemu-img -l ${s}`);
    assert.not.ok(existsSync(dsts[i]!));
  });
  const got = await pool(sels.map((s, i) => () => qimgA(['convert', '-l', s, '-O', 'raw', 'demo.qcow2', dsts[i]!], { cwd: FIXTURES })), 4);
  sels.forEach((s, i) => {
    assert.is(got[i]!.status, 1, `-l ${s}`);
    assert.is(got[i]!.stderr, "qimg: Failed to load snapshot: Can't find snapshot\n", `-l ${s}`);
    assert.is(got[i]!.stdout, '', `-l ${s}`);
    assert.not.ok(existsSync(dsts[i]!), `-l ${s}: output file created`);
  });
});

test('convert: -l on a raw source is refused like qemu-img', async () => {
  const dst = join(out, 'rawsnap.raw');
  const w = qemuImg(['convert', '-l', '1', '-O', 'raw', 'raw.img', dst], {}, FIXTURES);
  const g = await qimgA(['convert', '-l', '1', '-O', 'raw', 'raw.img', dst], { cwd: FIXTURES });
  assert.is(g.status, w.status);
  assert.is(g.stderr.replace(/^qimg: /, ''), w.stderr.replace(/^qemu-img: /, ''));
  assert.not.ok(existsSync(dst));
});

test('convert: a raw source whose size is not a multiple of 512 (qemu-img rounds it up)', async () => {
  const src = join(out, 'odd.img');
  writeFileSync(src, Buffer.alloc(524355, 0x5c));
  const want = join(out, 'odd-want.raw');
  const dst = join(out, 'odd-got.raw');
  qemuImg(['convert', '-O', 'raw', src, want]);
  const [r, i, iw] = await pool([() => qimgA(['convert', '-O', 'raw', src, dst]), () => qimgA(['info', src]), async () => qemuImg(['info', src])]);
  assert.is(r!.status, 0, r!.stderr);
  assert.fixture(i!.stdout, iw!.stdout, 'info');
  assert.is(statSync(dst).size, statSync(want).size, 'output size');
  assert.ok(Buffer.compare(readFileSync(dst), readFileSync(want)) === 0, 'output bytes');
});

test('convert: converting over a bigger existing output replaces it', async () => {
  const k = generatedKinds()[0]!;
  const dst = join(out, 'again.raw');
  const r = await qimgA(['convert', '-O', 'raw', k.path, dst]);
  assert.is(r.status, 0, r.stderr);
  // Overwriting an existing output truncates it first (as qemu-img does).
  const r2 = await qimgA(['convert', '-O', 'raw', join(FIXTURES, 'raw.img'), dst]);
  assert.is(r2.status, 0, r2.stderr);
  assert.ok(Buffer.compare(readFileSync(dst), readFileSync(join(FIXTURES, 'raw.img'))) === 0, 'overwritten output equals raw.img');
});

test.run();
