// Crash simulation of the writer: stop after every k-th write; the image must stay consistent
// (leaks at most) and every guest cluster must read as before or after.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Qcow2Image } from '../../src/qcow2/engine/qcow2-image.js';
import { ImageWriter } from '../../src/qcow2/engine/writer.js';
import { planQcow2, validateQcow2, writeQcow2Layout } from '../../src/qcow2/engine/create.js';
import type { MemoryFile } from '../../src/qcow2/io/memory-file.js';
import { assertConsistent, assertOldOrNew, crashSweep, guestBytes } from '../crash-harness.js';
import { mustQemuImg, mustQemuIo, tmpDir } from '../helpers.js';

const pat = (v: number, n: number) => new Uint8Array(n).fill(v);

function makeImage(opts: string, size: string, io: string[], snapshot = false): Uint8Array {
  const path = join(tmpDir(), 'c.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', opts, path, size]);
  if (io.length) mustQemuIo([...io.flatMap((c) => ['-c', c]), path]);
  if (snapshot) mustQemuImg(['snapshot', '-c', 'snap', path]);
  return new Uint8Array(readFileSync(path));
}

function writer(f: MemoryFile): ImageWriter {
  return new ImageWriter(Qcow2Image.open(f, 'mem'));
}

const SCENARIOS: Array<{ name: string; opts: string; io: string[]; snapshot: boolean; op: (w: ImageWriter) => void }> = [
  {
    name: 'guest writes (new clusters, in place, partial, zero, discard)',
    opts: 'cluster_size=4096',
    io: ['write -P 0x11 0 64k'],
    snapshot: false,
    op: (w) => {
      w.write(pat(0x21, 8192), 0); // in place
      w.write(pat(0x22, 100), 70000); // new, partial
      w.write(pat(0x23, 20000), 1 << 20);
      w.writeZeroes(16384, 4096); // each cluster is touched by one operation only,
      w.discard(20480, 4096); // so every cluster has exactly one old and one new state
    },
  },
  {
    name: 'copy-on-write away from a snapshot, with compressed clusters',
    opts: 'cluster_size=4096,refcount_bits=8',
    io: ['write -P 0x11 0 32k', 'write -c -P 0x12 64k 8k'],
    snapshot: true,
    op: (w) => {
      w.write(pat(0x31, 5000), 1000);
      w.write(pat(0x32, 4096), 64 * 1024);
      const c = pat(0x33, 4096);
      c[7] = 9;
      w.writeCompressed(40, c);
    },
  },
  {
    name: 'refcount table growth and L1 growth (512-byte clusters, 64-bit refcounts)',
    opts: 'cluster_size=512,refcount_bits=64',
    io: ['write -P 0x11 0 4k'],
    snapshot: false,
    op: (w) => {
      w.resize(8 << 20);
      for (let i = 0; i < 8; i++) w.write(pat(0x40 + i, 16384), i << 20);
    },
  },
  {
    name: 'extended L2 subcluster writes',
    opts: 'cluster_size=65536,extended_l2=on',
    io: ['write -P 0x11 0 4k'],
    snapshot: true,
    op: (w) => {
      w.write(pat(0x51, 3000), 100);
      w.write(pat(0x52, 2048), 65536 + 4096);
      w.writeZeroes(8192, 2048);
    },
  },
  {
    name: 'resize: grow past the L1 table, then shrink over data',
    opts: 'cluster_size=512',
    io: ['write -P 0x11 0 1M'],
    snapshot: false,
    op: (w) => {
      w.resize(4 << 20); // 512-byte clusters: the L1 table moves to new clusters
      w.write(pat(0x61, 2048), 3 << 20);
      w.commit();
      w.resize(1536 << 10);
    },
  },
  {
    name: 'convert-like bulk writes with compressed clusters',
    opts: 'cluster_size=4096,refcount_bits=16',
    io: [],
    snapshot: false,
    op: (w) => {
      for (let gc = 0; gc < 48; gc++) {
        const c = pat(gc, 4096);
        c[gc] = 0xee;
        if (gc % 3 === 0) w.writeCompressed(gc, c);
        else w.write(c, gc * 4096);
      }
    },
  },
];

for (const s of SCENARIOS) {
  test(`crash at every write: ${s.name}`, async () => {
    const image = makeImage(s.opts, '2M', s.io, s.snapshot);
    const before = guestBytes(image);
    const snapBefore = s.snapshot ? guestBytes(image, '1') : null;
    let after: Uint8Array | null = null;
    const results = await crashSweep(image, async (f) => {
      const w = writer(f);
      s.op(w);
      w.commit();
    });
    const clean = results[results.length - 1]!;
    assert.not.ok(clean.crashed);
    after = guestBytes(clean.bytes);
    const cs = Qcow2Image.open(new (await import('../../src/qcow2/io/memory-file.js')).MemoryFile(image), 'm').clusterSize;
    assert.ok(results.length > 5, `only ${results.length} outcomes`);
    for (const r of results) {
      assertConsistent(r.bytes, r.k);
      const got = guestBytes(r.bytes);
      // Sizes can differ mid-resize: compare over the common prefix, zero-extended.
      const n = Math.max(before.length, after.length);
      const ext = (b: Uint8Array) => { const o = new Uint8Array(n); o.set(b.subarray(0, n)); return o; };
      assertOldOrNew(ext(got), ext(before), ext(after), cs, `crash before write ${r.k + 1}`);
      if (snapBefore) assert.ok(Buffer.compare(guestBytes(r.bytes, '1'), snapBefore) === 0, `snapshot changed (k=${r.k})`);
    }
  });
}

test('crash at every write during create: no image or a complete one that checks clean', async () => {
  for (const opts of [{ size: 8 << 20 }, { size: 64 << 20, preallocation: 'metadata' as const, clusterSize: 4096 }]) {
    const p = validateQcow2('mem', { format: 'qcow2', ...opts }, opts.size);
    const plan = planQcow2(p);
    const results = await crashSweep(new Uint8Array(0), (f) => {
      f.truncate(plan.fileSize);
      writeQcow2Layout(f, p, plan);
    });
    for (const r of results) {
      const header = r.bytes.subarray(0, 4);
      if (header.every((b) => b === 0)) continue; // the header never landed: not an image, nothing references anything
      assert.not.ok(r.crashed, `k=${r.k}: a header was written before the tables were complete`);
      assertConsistent(r.bytes, r.k);
    }
    const last = results[results.length - 1]!;
    assert.is(Buffer.from(last.bytes.subarray(0, 4)).toString('latin1'), 'QFI\xfb');
  }
});

test.run();
