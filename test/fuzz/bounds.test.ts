// Resource bounds on crafted images that blow up naive readers: every command answers (or
// refuses) within the time and memory budget the README states, measured on real processes.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import { closeSync, openSync, readFileSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { encodeSnapshotTable, type SnapshotEntry } from '../../src/qcow2/format/snapshot-table.js';
import { mustQemuImg, mustQemuIo, tmpDir } from '../helpers.js';
import { cliHasCheck, runQimgBounded, type CliRun } from './harness.js';
import { putU32, putU64 } from './mutate.js';

/** The budget the README promises for info / snapshot -l / check on any input. */
const BUDGET_MS = 10_000;
const BUDGET_RSS_MIB = 300;

const dir = tmpDir('qimg-bounds-');
const withCheck = cliHasCheck();

function u32(b: Uint8Array, o: number): number {
  return ((b[o]! << 24) | (b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!) >>> 0;
}

/** A small valid image to graft crafted tables onto (64 KiB clusters, 1 L1 entry). */
function baseImage(name: string): { path: string; bytes: Uint8Array; cs: number } {
  const path = join(dir, name);
  mustQemuImg(['create', '-q', '-f', 'qcow2', path, '64M']);
  mustQemuIo(['-f', 'qcow2', '-c', 'write -P 0x5a 0 64k', path]);
  return { path, bytes: new Uint8Array(readFileSync(path)), cs: 65536 };
}

function appendAligned(path: string, bytes: Uint8Array, cs: number, tail: Uint8Array): number {
  const at = Math.ceil(bytes.length / cs) * cs;
  const fd = openSync(path, 'r+');
  writeSync(fd, bytes, 0, bytes.length, 0);
  writeSync(fd, tail, 0, tail.length, at);
  closeSync(fd);
  return at;
}

function patchHeader(path: string, patch: (h: Uint8Array) => void): void {
  const fd = openSync(path, 'r+');
  const h = new Uint8Array(512);
  const b = readFileSync(path).subarray(0, 512);
  h.set(b);
  patch(h);
  writeSync(fd, h, 0, 512, 0);
  closeSync(fd);
}

/** Every read-only command on `path`, each a bounded real process. */
function readCommands(path: string): Array<[string, CliRun]> {
  const runs: Array<[string, CliRun]> = [
    ['info', runQimgBounded(['info', path], BUDGET_MS * 2)],
    ['info --output=json', runQimgBounded(['info', '--output=json', path], BUDGET_MS * 2)],
    ['snapshot -l', runQimgBounded(['snapshot', '-l', path], BUDGET_MS * 2)],
    ['snapshot -l --output=json', runQimgBounded(['snapshot', '-l', '--output=json', path], BUDGET_MS * 2)],
  ];
  if (withCheck) runs.push(['check', runQimgBounded(['check', path], BUDGET_MS * 2)]);
  return runs;
}

function assertBounded(what: string, runs: Array<[string, CliRun]>, expect: (cmd: string, r: CliRun) => void): void {
  for (const [cmd, r] of runs) {
    const mib = Math.round(r.maxRSSKiB / 1024);
    console.log(`    ${what}: ${cmd}: exit ${r.status}, ${r.ms} ms, ${mib} MiB${r.stderr ? ' — ' + r.stderr.trim().split('\n')[0]!.slice(0, 110) : ''}`);
    assert.ok(!r.timedOut && r.ms < BUDGET_MS, `${what}: ${cmd} took ${r.ms} ms`);
    assert.ok(mib < BUDGET_RSS_MIB, `${what}: ${cmd} peaked at ${mib} MiB`);
    assert.not.match(r.stderr, /    at |internal error/, `${what}: ${cmd}: ${r.stderr}`);
    expect(cmd, r);
  }
}

test('an L1 table of 4,194,304 entries (32 MiB, QEMU\'s cap) is read within budget', () => {
  const path = join(dir, 'l1max.qcow2');
  // 512-byte clusters: one L1 entry maps 32 KiB, so 128 GiB needs exactly 4,194,304 entries.
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', path, '128G']);
  const h = readFileSync(path).subarray(0, 512);
  assert.is(u32(h, 36), 4194304);
  assertBounded('L1 4M entries', readCommands(path), (cmd, r) => assert.ok(cmd === 'check' ? [0, 3].includes(r.status!) : r.status === 0, `${cmd}: ${r.stderr}`));
  // One more entry than QEMU allows is refused before anything is allocated for it.
  patchHeader(path, (b) => putU32(b, 36, 4194305));
  assertBounded('L1 4M+1 entries', [['info', runQimgBounded(['info', path])]], (_c, r) => {
    assert.is(r.status, 1);
    assert.match(r.stderr, /Active L1 table too large/);
  });
});

function snapshotEntries(n: number, l1Offset: number, l1Size: number, size: number): SnapshotEntry[] {
  const out: SnapshotEntry[] = [];
  for (let i = 0; i < n; i++) {
    out.push({
      l1TableOffset: l1Offset,
      l1Size,
      id: String(i + 1),
      name: `s${i}`,
      dateSec: 1_700_000_000,
      dateNsec: 0,
      vmClockNsec: 0n,
      vmStateSize32: 0,
      extraData: new Uint8Array(24),
      vmStateSizeLarge: 0,
      diskSize: size,
      icount: null,
    });
  }
  return out;
}

test('65,536 snapshots (QEMU\'s cap) list and describe within budget; 65,537 are refused', () => {
  const { path, bytes, cs } = baseImage('snap64k.qcow2');
  const l1Offset = u32(bytes, 44);
  const table = encodeSnapshotTable(snapshotEntries(65536, l1Offset, u32(bytes, 36), 64 * 1024 * 1024));
  const at = appendAligned(path, bytes, cs, table);
  patchHeader(path, (b) => {
    putU32(b, 60, 65536);
    putU64(b, 64, BigInt(at));
  });
  assertBounded('65536 snapshots', readCommands(path), (cmd, r) => {
    if (cmd !== 'check') assert.is(r.status, 0, `${cmd}: ${r.stderr}`);
  });
  patchHeader(path, (b) => putU32(b, 60, 65537));
  assertBounded('65537 snapshots', [['info', runQimgBounded(['info', path])]], (_c, r) => {
    assert.is(r.status, 1);
    assert.match(r.stderr, /Snapshot table too large/);
  });
});

test('a snapshot table claiming 65,536 entries with 1 KiB of extra data each (> 64 MiB) is refused within budget', () => {
  const { path, bytes, cs } = baseImage('snapextra.qcow2');
  const l1Offset = u32(bytes, 44);
  const entryBytes = 40 + 1024 + 8; // id "NNNNN" + name "s" padded to 8
  const n = 65536;
  const table = new Uint8Array(n * entryBytes);
  for (let i = 0; i < n; i++) {
    const o = i * entryBytes;
    putU64(table, o, BigInt(l1Offset));
    putU32(table, o + 8, 1);
    table[o + 13] = 4; // id_str_size
    table[o + 15] = 1; // name_size
    putU32(table, o + 36, 1024); // extra_data_size: QEMU's per-entry maximum
    putU64(table, o + 48, BigInt(64 * 1024 * 1024)); // extra: disk_size
    table.set(new TextEncoder().encode(String(i % 10000).padStart(4, '0') + 's'), o + 40 + 1024);
  }
  const at = appendAligned(path, bytes, cs, table);
  patchHeader(path, (b) => {
    putU32(b, 60, n);
    putU64(b, 64, BigInt(at));
  });
  assertBounded('65536 x 1 KiB extra', readCommands(path), (cmd, r) => {
    assert.is(r.status, 1, `${cmd}: ${r.stderr}`);
    if (cmd !== 'check') assert.match(r.stderr, /Snapshot table too large/);
  });
});

test('nb_snapshots pointing past the end of the file is refused at once', () => {
  const { path, bytes, cs } = baseImage('snappast.qcow2');
  writeFileSync(path, bytes);
  patchHeader(path, (b) => {
    putU32(b, 60, 65536);
    putU64(b, 64, BigInt(Math.ceil(bytes.length / cs) * cs + cs * 1024));
  });
  assertBounded('table past EOF', readCommands(path), (cmd, r) => {
    // check, like qemu-img check, counts the table's clusters past EOF as corruptions.
    assert.ok(cmd === 'check' ? [1, 2].includes(r.status!) : r.status === 1, `${cmd}: ${r.stderr}`);
    if (cmd !== 'check') assert.match(r.stderr, /Snapshot table lies past the end of the file/);
  });
});

test('a refcount table of 8 MiB (QEMU\'s cap) is within budget; one cluster more is refused', () => {
  const { path, bytes, cs } = baseImage('reft8m.qcow2');
  const reftOffset = u32(bytes, 52);
  const table = new Uint8Array(8 * 1024 * 1024);
  table.set(bytes.subarray(reftOffset, reftOffset + cs));
  const at = appendAligned(path, bytes, cs, table);
  patchHeader(path, (b) => {
    putU64(b, 48, BigInt(at));
    putU32(b, 56, (8 * 1024 * 1024) / cs);
  });
  assertBounded('reftable 8 MiB', readCommands(path), (cmd, r) => {
    if (cmd !== 'check') assert.is(r.status, 0, `${cmd}: ${r.stderr}`);
  });
  const w = runQimgBounded(['snapshot', '-c', 'x', path]);
  assertBounded('reftable 8 MiB', [['snapshot -c', w]], () => {});
  patchHeader(path, (b) => putU32(b, 56, (8 * 1024 * 1024) / cs + 1));
  assertBounded('reftable 8 MiB + 1 cluster', [['info', runQimgBounded(['info', path])]], (_c, r) => {
    assert.is(r.status, 1);
    assert.match(r.stderr, /Reference count table too large/);
  });
});

test('a backing chain of 256 images is followed; 257 are refused', () => {
  const d = join(dir, 'chain');
  spawnSync('mkdir', ['-p', d]);
  mustQemuImg(['create', '-q', '-f', 'qcow2', join(d, 'c0.qcow2'), '1M']);
  mustQemuIo(['-f', 'qcow2', '-c', 'write -P 0x11 0 4k', join(d, 'c0.qcow2')]);
  for (let i = 1; i <= 256; i++) {
    mustQemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', `c${i - 1}.qcow2`, '-F', 'qcow2', join(d, `c${i}.qcow2`), '1M']);
  }
  const ok = join(d, 'c255.qcow2'); // c255 -> ... -> c0: 256 images
  const runs: Array<[string, CliRun]> = [
    ['info --backing-chain', runQimgBounded(['info', '--backing-chain', ok])],
    ['convert -O raw', runQimgBounded(['convert', '-O', 'raw', ok, join(d, 'out.raw')])],
  ];
  assertBounded('256-deep chain', runs, (cmd, r) => assert.is(r.status, 0, `${cmd}: ${r.stderr}`));
  assert.is(readFileSync(join(d, 'out.raw'))[0], 0x11);
  const deep = join(d, 'c256.qcow2');
  assertBounded('257-deep chain', [['info --backing-chain', runQimgBounded(['info', '--backing-chain', deep])]], (_c, r) => {
    assert.is(r.status, 1);
    assert.match(r.stderr, /backing chain is deeper than 256 images/);
  });
});

test.run();
