// The streaming checker: identical reports for every read-chunk size and for traversal-order
// ("exact") counting; crash simulation of -r all; several files at once; the engine hook.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { check, repairRefcounts } from '../../src/qcow2/check/index.js';
import { CheckImage } from '../../src/qcow2/check/image.js';
import { CheckPass, FIX_ERRORS, FIX_LEAKS } from '../../src/qcow2/check/checker.js';
import { MemoryFile } from '../../src/qcow2/io/memory-file.js';
import { assertConsistent, crashSweep, oracleCheck } from '../crash-harness.js';
import { qemuImg, tmpDir } from '../helpers.js';
import { DAMAGES, makeBase, Poker } from './poke.js';
import { qimgCheck } from './cli.js';

const dir = tmpDir('qimg-check-stream-');
const base4k = join(dir, 'c4k.qcow2');
makeBase(base4k, { name: 'c4k', opts: 'cluster_size=4096' });
const base64k = join(dir, 'c64k.qcow2');
makeBase(base64k, { name: 'c64k', opts: 'cluster_size=65536' });

function damage(base: string, name: string): string {
  const di = DAMAGES.findIndex((d) => d.name.startsWith(name));
  assert.ok(di >= 0, name);
  const p = Poker.load(base);
  DAMAGES[di]!.poke(p);
  const out = join(dir, `${di}-${base.endsWith('c4k.qcow2') ? '4k' : '64k'}.qcow2`);
  p.save(out);
  return out;
}

test('same report with every read chunk size and with traversal-order counting', async () => {
  const names = ['clean', 'leak (refcount too high)', 'refcount too low', 'L2 entry unaligned', 'data overlaps L1', 'several', 'compressed descriptor', 'two L1 entries'];
  for (const base of [base4k, base64k]) {
    for (const n of names) {
      const f = damage(base, n);
      const want = await check(f, { exact: true });
      for (const chunkBytes of [4096, 3 * 65536, 1 << 20, undefined]) {
        const got = await check(f, { chunkBytes });
        assert.equal(got, want, `${f} (${n}) chunk ${chunkBytes}`);
      }
    }
  }
});

test('crash at any write of -r all on a leaky image leaves no corruption', async () => {
  const f = damage(base4k, 'several');
  const p = Poker.load(f);
  // Leaks only: drop the zero-refcount part of "several" by re-poking a clean copy.
  const leaky = Poker.load(base4k);
  leaky.grow(3);
  leaky.setrc(leaky.clusters - 1, 1);
  leaky.setrc(leaky.clusters - 3, 1);
  leaky.setrc(leaky.dataCluster(leaky.ge(4096)), leaky.getrc(leaky.dataCluster(leaky.ge(4096))) + 1);
  void p;
  const op = (file: MemoryFile) => {
    new CheckPass(CheckImage.open(file, 'mem'), FIX_LEAKS | FIX_ERRORS, []).run();
  };
  const outcomes = await crashSweep(leaky.b, op);
  for (const o of outcomes) assertConsistent(o.bytes, o.k);
  const last = oracleCheck(outcomes[outcomes.length - 1]!.bytes);
  assert.not.ok(last.leaks, 'the complete repair leaves no leaks');
});

test('crash at any write of a refcount rebuild: never more corruption than before, complete run is clean', async () => {
  const f = damage(base4k, 'several');
  const bytes = new Uint8Array(readFileSync(f));
  const before = oracleCheck(bytes).corruptions ?? 0;
  const op = (file: MemoryFile) => {
    new CheckPass(CheckImage.open(file, 'mem'), FIX_LEAKS | FIX_ERRORS, []).run();
  };
  const outcomes = await crashSweep(bytes, op);
  for (const o of outcomes) {
    const j = oracleCheck(o.bytes);
    assert.ok((j.corruptions ?? 0) <= before, `crash before write ${o.k + 1}: ${j.corruptions} corruptions (was ${before})`);
    assert.not.ok(j['check-errors'], `crash before write ${o.k + 1}: check errors`);
  }
  const last = oracleCheck(outcomes[outcomes.length - 1]!.bytes);
  assert.not.ok(last.corruptions, 'complete rebuild: no corruptions');
});

test('repairRefcounts() repairs an image the engine holds open read-write', () => {
  const f = damage(base64k, 'refcount zero on data');
  const file = new MemoryFile(new Uint8Array(readFileSync(f)), f, true);
  const { counts, messages } = repairRefcounts(file);
  assert.is(counts.corruptions, 0);
  assert.ok(counts.corruptionsFixed >= 1, JSON.stringify(counts));
  assert.ok(messages.includes('Rebuilding refcount structure'), messages.join('\n'));
  const out = join(dir, 'repaired.qcow2');
  writeFileSync(out, file.bytes());
  assert.is(qemuImg(['check', out]).status, 0);
});

test('several files: reports in argument order (JSON array, human blocks), worst exit code', async () => {
  const clean = base64k;
  const leak = damage(base64k, 'leak (appended');
  const corrupt = damage(base4k, 'refcount zero on data');
  const raw = join(dir, 'x.raw');
  writeFileSync(raw, new Uint8Array(4096));
  const j = await qimgCheck(['--output=json', clean, leak, corrupt]);
  assert.is(j.status, 2, j.stderr);
  const arr = JSON.parse(j.stdout) as { filename: string; leaks?: number; corruptions?: number }[];
  assert.equal(arr.map((x) => x.filename), [clean, leak, corrupt]);
  for (const [i, f] of [clean, leak, corrupt].entries()) {
    const one = JSON.parse(qemuImg(['check', '--output=json', f]).stdout) as Record<string, unknown>;
    assert.equal(arr[i], one, f);
  }
  const h = await qimgCheck([leak, clean]);
  assert.is(h.status, 3);
  const wantLeak = qemuImg(['check', leak]).stdout;
  const wantClean = qemuImg(['check', clean]).stdout;
  assert.is(h.stdout, `image: ${leak}\n${wantLeak}\nimage: ${clean}\n${wantClean}`);
  assert.ok(h.stderr.startsWith(`${leak}: Leaked cluster `), h.stderr);
  const r = await qimgCheck([clean, raw]);
  assert.is(r.status, 63);
  const m = await qimgCheck([join(dir, 'missing.qcow2'), leak]);
  assert.is(m.status, 1);
});

test.run();
