// Snapshot-table damage under qimg check (read-only and -r all) against qemu-img check 7.2:
// overlong extra data, v3 entries without their 16 bytes of extra data, more than 65,536
// entries, a table over 64 MiB, plus the entry damage qemu-img reports but does not repair.
// Same stdout / stderr / exit code, the same bytes afterwards, and the same `snapshot -l`; then
// crash simulations of the two repairs that write.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { CheckImage } from '../../src/qcow2/check/image.js';
import { CheckPass, FIX_ERRORS, FIX_LEAKS } from '../../src/qcow2/check/checker.js';
import type { MemoryFile } from '../../src/qcow2/io/memory-file.js';
import { crashSweep } from '../crash-harness.js';
import { qemuImg, tmpDir } from '../helpers.js';
import { asQimg, qimgCheck } from './cli.js';
import { makeBase, Poker } from './poke.js';
import { same } from './cases.js';

const dir = tmpDir('qimg-check-snap-');
const base = join(dir, 'base.qcow2');
makeBase(base, { name: 'c64k', opts: 'cluster_size=65536' });
const baseV2 = join(dir, 'base-v2.qcow2');
makeBase(baseV2, { name: 'v2', opts: 'compat=0.10,cluster_size=65536' });

/**
 * Replaces the snapshot table with `count` entries: the image's own entry first, then entries
 * with no L1 table (l1_size 0: they reference nothing), each with `nameBytes` of name. The new
 * table is appended with refcount 1, the old one is freed and zeroed: a consistent image whose
 * only problem is the table's size.
 */
function bigTable(from: string, out: string, count: number, nameBytes: number): void {
  const p = Poker.load(from);
  const cs = p.cs;
  const first = p.b.subarray(p.snoff, p.snoff + 40 + p.dv.getUint32(p.snoff + 36) + p.dv.getUint16(p.snoff + 12) + p.dv.getUint16(p.snoff + 14));
  const entries: Uint8Array[] = [first.slice()];
  const name = new Uint8Array(nameBytes).fill(0x61);
  for (let i = 1; i < count; i++) {
    const id = new TextEncoder().encode(String(i + 1));
    const e = new Uint8Array(40 + 24 + id.length + name.length);
    const dv = new DataView(e.buffer);
    dv.setUint16(12, id.length);
    dv.setUint16(14, name.length);
    dv.setUint32(16, 1700000000 + i);
    dv.setUint32(36, 24);
    dv.setUint32(40 + 8, 64 * 1024 * 1024); // disk size 64M
    e.fill(0xff, 40 + 16, 40 + 24); // no icount
    e.set(id, 64);
    e.set(name, 64 + id.length);
    entries.push(e);
  }
  let size = 0;
  for (const e of entries) size = Math.ceil(size / 8) * 8 + e.length;
  const start = p.clusters;
  const clusters = Math.ceil(size / cs);
  p.grow(clusters);
  let off = start * cs;
  for (const e of entries) {
    off = Math.ceil(off / 8) * 8;
    p.b.set(e, off);
    off += e.length;
  }
  for (let c = 0; c < clusters; c++) p.setrc(start + c, 1);
  p.setrc(p.snoff / cs, 0);
  p.b.fill(0, p.snoff, p.snoff + cs);
  p.dv.setUint32(60, count);
  p.setq(64, start * cs);
  // Cut the file where the table ends, as qemu-img leaves it after writing a table.
  p.b = p.b.subarray(0, start * cs + size);
  p.save(out);
}

interface Case {
  name: string;
  make(out: string): void;
}

const poke = (from: string, f: (p: Poker) => void) => (out: string) => {
  const p = Poker.load(from);
  f(p);
  p.save(out);
};

const CASES: Case[] = [
  { name: 'extra data over 1024 bytes', make: poke(base, (p) => p.dv.setUint32(p.snoff + 36, 2000)) },
  { name: 'v3 entry with no extra data', make: poke(base, (p) => p.dv.setUint32(p.snoff + 36, 0)) },
  { name: 'v3 entry with 8 bytes of extra data', make: poke(base, (p) => p.dv.setUint32(p.snoff + 36, 8)) },
  { name: 'v2 entry with no extra data (allowed on v2)', make: poke(baseV2, (p) => p.dv.setUint32(p.snoff + 36, 0)) },
  { name: 'v2 entry with extra data over 1024 bytes', make: poke(baseV2, (p) => p.dv.setUint32(p.snoff + 36, 5000)) },
  { name: 'count one too high (an all-zero entry follows)', make: poke(base, (p) => p.dv.setUint32(60, 2)) },
  { name: 'L1 table offset unaligned (reported, not repaired)', make: poke(base, (p) => p.setq(p.snoff, p.q(p.snoff) + 0x200)) },
  { name: 'L1 table past the end of the file (reported, not repaired)', make: poke(base, (p) => p.setq(p.snoff, 2 ** 30)) },
  { name: '65,540 entries (4 over the limit)', make: (out) => bigTable(base, out, 65540, 0) },
  { name: 'table over 64 MiB', make: (out) => bigTable(base, out, 1026, 65500) },
];

const snapList = (f: string) => qemuImg(['snapshot', '-l', '-U', f]);

for (const c of CASES) {
  test(`snapshot table: ${c.name}: check and check -r all match qemu-img`, async () => {
    const f = join(dir, 'damaged.qcow2');
    c.make(f);
    same(await qimgCheck([f]), asQimg(qemuImg(['check', f])), `${c.name}: check`);
    same(await qimgCheck(['--output=json', f]), asQimg(qemuImg(['check', '--output=json', f])), `${c.name}: check --output=json`);
    const theirs = join(dir, 'theirs.qcow2');
    const mine = join(dir, 'mine.qcow2');
    copyFileSync(f, theirs);
    copyFileSync(f, mine);
    const want = asQimg(qemuImg(['check', '-r', 'all', theirs]), theirs, mine);
    same(await qimgCheck(['-r', 'all', mine]), want, `${c.name}: -r all`);
    assert.ok(readFileSync(mine).equals(readFileSync(theirs)), `${c.name}: same bytes as qemu-img's repair`);
    const after = qemuImg(['check', mine]);
    assert.is(after.status, want.status === 0 ? 0 : after.status, `${c.name}: qemu-img check after: ${after.stdout}${after.stderr}`);
    assert.is(snapList(mine).stdout, snapList(theirs).stdout, `${c.name}: snapshot -l`);
    // The JSON of a repair too (on fresh copies).
    copyFileSync(f, theirs);
    copyFileSync(f, mine);
    const wantJson = asQimg(qemuImg(['check', '-r', 'all', '--output=json', theirs]), theirs, mine);
    same(await qimgCheck(['-r', 'all', '--output=json', mine]), wantJson, `${c.name}: -r all --output=json`);
  });
}

/** qemu-img check on bytes: exit code, JSON (if any) and stderr. */
function oracle(bytes: Uint8Array): { status: number; json: Record<string, number> | null; stderr: string } {
  const path = join(dir, 'crash.qcow2');
  writeFileSync(path, bytes);
  const r = qemuImg(['check', '--output=json', path]);
  let json: Record<string, number> | null = null;
  try {
    json = JSON.parse(r.stdout) as Record<string, number>;
  } catch {
    json = null;
  }
  return { status: r.status, json, stderr: r.stderr };
}

const repairOp = (file: MemoryFile) => {
  new CheckPass(CheckImage.open(file, 'mem'), FIX_LEAKS | FIX_ERRORS, []).run();
};

test('crash at any write of a snapshot table rewrite: the old table or the new one, leaks only', async () => {
  for (const extra of [0, 2000]) {
    const f = join(dir, `crash-src-${extra}.qcow2`);
    poke(base, (p) => p.dv.setUint32(p.snoff + 36, extra))(f);
    const bytes = new Uint8Array(readFileSync(f));
    const outcomes = await crashSweep(bytes, repairOp);
    for (const o of outcomes) {
      const r = oracle(o.bytes);
      const at = `extra ${extra}, crash before write ${o.k + 1}`;
      if (extra === 2000 && r.status === 1) {
        // The old table is still the one in the header: qemu-img refuses it as before.
        assert.match(r.stderr, /Too much extra metadata in snapshot table entry 0/, at);
        continue;
      }
      assert.ok(r.json, `${at}: ${r.stderr}`);
      assert.not.ok(r.json!['check-errors'], `${at}: check errors`);
      // Only the damage itself (the incomplete entry) may remain, never a refcount error.
      assert.ok((r.json!.corruptions ?? 0) <= (extra === 0 ? 1 : 0), `${at}: ${r.json!.corruptions} corruptions: ${r.stderr}`);
      if ((r.json!.corruptions ?? 0) > 0) assert.match(r.stderr, /snapshot table entry 0 is incomplete/, at);
    }
    const last = oracle(outcomes[outcomes.length - 1]!.bytes);
    assert.is(last.status, 0, `extra ${extra}: the complete repair is clean: ${last.stderr}`);
  }
});

test('crash at any write of discarding overhanging snapshots: refused as before, or leaks only', async () => {
  const f = join(dir, 'crash-over.qcow2');
  bigTable(base, f, 65540, 0);
  const bytes = new Uint8Array(readFileSync(f));
  const outcomes = await crashSweep(bytes, repairOp);
  for (const o of outcomes) {
    const r = oracle(o.bytes);
    const at = `crash before write ${o.k + 1}`;
    if (r.status === 1) {
      assert.match(r.stderr, /snapshot table too large/, at);
      continue;
    }
    assert.ok(r.json, `${at}: ${r.stderr}`);
    assert.not.ok(r.json!.corruptions, `${at}: corruptions`);
    assert.not.ok(r.json!['check-errors'], `${at}: check errors`);
  }
  assert.is(oracle(outcomes[outcomes.length - 1]!.bytes).status, 0, 'the complete repair is clean');
});

test.run();
