// `qimg convert -O raw` against `qemu-img convert -O raw`: same bytes (active layer and every
// internal snapshot, in every -l form), output no less sparse, and qemu-img's refusals.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { existsSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { FIXTURES, mustQemuImg, mustQemuIo, qemuImg, qimg, tmpDir, type RunResult } from '../helpers.js';
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

// Found while reading convert's -o errors against qemu-img 7.2: qimg printed create's words for
// them ("F: Invalid parameter"), where convert reports option errors bare and creation errors as
// "F: error while converting FMT: ...", refused -t/-T/-m/-W (OpenStack passes -t none), ignored
// -o preallocation for raw targets, and left a half-made target behind for -o data_file.
test('convert options and their errors as qemu-img convert words them', () => {
  const dir = tmpDir();
  const src = join(dir, 'src.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', src, '1M']);
  mustQemuIo(['-c', 'write -P 1 0 512k', src]);
  const dst = join(dir, 'dst.img');
  const missing = join(dir, 'missing.qcow2');
  const cases: string[][] = [
    ['-O', 'qcow2', '-o', 'bogus=1', src, dst],
    ['-O', 'qcow2', '-o', 'cluster_size=3', src, dst],
    ['-O', 'qcow2', '-o', 'refcount_bits=x', src, dst],
    ['-O', 'qcow2', '-o', 'lazy_refcounts=x', src, dst],
    ['-O', 'qcow2', '-o', 'compat=9', src, dst],
    ['-O', 'qcow2', '-o', 'compat=0.10,lazy_refcounts=on', src, dst],
    ['-O', 'qcow2', '-o', `backing_file=${src}`, src, dst],
    ['-O', 'qcow2', '-B', src, src, dst],
    ['-O', 'qcow2', '-B', src, '-o', 'bogus=1', src, dst],
    ['-O', 'bogusfmt', '-o', 'bogus=1', src, dst],
    ['-O', 'qcow2', src, join(dir, 'no', 'such.img')],
    ['-O', 'raw', src, join(dir, 'no', 'such.img')],
    ['-O', 'raw', '-o', 'bogus=1', src, dst],
    ['-O', 'raw', '-o', 'preallocation=bogus', src, dst],
    ['-O', 'raw', '-o', 'preallocation=metadata', src, dst],
    ['-O', 'qcow2', '-t', 'bogus', src, dst],
    ['-O', 'qcow2', '-T', 'bogus', src, dst],
    ['-O', 'qcow2', '-T', 'bogus', '-t', 'bogus', src, dst],
    ['-O', 'qcow2', '-m', '0', src, dst],
    ['-O', 'qcow2', '-m', '17', src, dst],
    ['-O', 'qcow2', '-m', '021', src, dst], // octal 17
    ['-O', 'qcow2', '-m', '0x10', src, dst],
    ['-O', 'qcow2', '-t', 'none', '-T', 'none', '-W', '-m', '8', src, dst],
    ['-O', 'raw', '-t', 'writeback', src, dst],
    ['-O', 'raw', '-o', 'preallocation=full', src, dst],
    ['-O', 'qcow2', '-o', 'bogus=1', missing, dst],
  ];
  for (const args of cases) {
    rmSync(dst, { force: true });
    const q = qemuImg(['convert', ...args]);
    const qBytes = existsSync(dst) && q.status === 0 ? readFileSync(dst) : null;
    const qAlloc = qBytes ? allocatedBytes(dst) : 0;
    rmSync(dst, { force: true });
    const m = qimg(['convert', ...args]);
    const what = `convert ${args.join(' ')}`;
    assert.is(m.status, q.status, `${what}: ${m.stderr} vs ${q.stderr}`);
    // qemu-img repeats "Could not open 'F': " for a missing source (README, deliberate differences).
    assert.is(m.stderr, q.stderr.replace(/qemu-img/g, 'qimg').replace(/(Could not open '[^']*': )\1/, '$1'), what);
    if (qBytes) {
      if (args.includes('raw')) {
        assert.ok(readFileSync(dst).equals(qBytes), `${what}: the raw output`);
        assert.is(allocatedBytes(dst) >= qBytes.length, qAlloc >= qBytes.length, `${what}: preallocated as qemu-img's`);
      } else assert.is(qemuImg(['compare', src, dst]).status, 0, `${what}: the output reads back as the source`);
    }
  }
  // An external data file: qemu-img converts; qimg refuses before making anything.
  rmSync(dst, { force: true });
  const r = qimg(['convert', '-O', 'qcow2', '-o', `data_file=${join(dir, 'data.raw')}`, src, dst]);
  assert.is(r.status, 1);
  assert.match(r.stderr, 'external data file is not supported');
  assert.not.ok(existsSync(dst), 'no target left behind');
  assert.not.ok(existsSync(join(dir, 'data.raw')), 'no data file left behind');
});

test.run();
