// create(): byte-for-byte against qemu-img create, qemu-img check clean, writable by qemu-io, sparse 1 TiB preallocation.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readFileSync, statSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { create, formattingLine, planQcow2, validateQcow2, type CreateOptions } from '../../src/qcow2/engine/create.js';
import { QimgError } from '../../src/qcow2/errors.js';
import { mustQemuImg, mustQemuIo, qemuImg, tmpDir } from '../helpers.js';

const dir = tmpDir('qimg-create-');
mustQemuImg(['create', '-q', '-f', 'raw', join(dir, 'base.raw'), '3M']);
mustQemuImg(['create', '-q', '-f', 'qcow2', join(dir, 'base.qcow2'), '5M']);

interface Case {
  name: string;
  /** qemu-img create arguments before FILE SIZE. */
  args: string[];
  size: string;
  opts: Omit<CreateOptions, 'format'>;
  /** Not byte-identical (QEMU grows its refcount table; qimg sizes it up front). */
  layoutDiffers?: boolean;
}

const M = 1024 * 1024;
const CASES: Case[] = [
  { name: 'default', args: [], size: '64M', opts: { size: 64 * M } },
  { name: 'v2', args: ['-o', 'compat=0.10'], size: '1M', opts: { size: M, compat: '0.10' } },
  { name: 'cluster 512', args: ['-o', 'cluster_size=512'], size: '1M', opts: { size: M, clusterSize: 512 } },
  { name: 'cluster 4k', args: ['-o', 'cluster_size=4k'], size: '1M', opts: { size: M, clusterSize: 4096 } },
  { name: 'cluster 2M', args: ['-o', 'cluster_size=2M'], size: '1M', opts: { size: M, clusterSize: 2 * M } },
  { name: 'refcount 1', args: ['-o', 'refcount_bits=1'], size: '1M', opts: { size: M, refcountBits: 1 } },
  { name: 'refcount 8', args: ['-o', 'refcount_bits=8'], size: '1M', opts: { size: M, refcountBits: 8 } },
  { name: 'refcount 64, 512 clusters', args: ['-o', 'refcount_bits=64,cluster_size=512'], size: '1M', opts: { size: M, refcountBits: 64, clusterSize: 512 } },
  { name: 'lazy + zstd', args: ['-o', 'lazy_refcounts=on,compression_type=zstd'], size: '1M', opts: { size: M, lazyRefcounts: true, compressionType: 'zstd' } },
  { name: 'extended L2', args: ['-o', 'extended_l2=on'], size: '1M', opts: { size: M, extendedL2: true } },
  { name: 'metadata', args: ['-o', 'preallocation=metadata'], size: '64M', opts: { size: 64 * M, preallocation: 'metadata' } },
  { name: 'metadata 4k (refblocks between runs)', args: ['-o', 'preallocation=metadata,cluster_size=4k'], size: '64M', opts: { size: 64 * M, preallocation: 'metadata', clusterSize: 4096 } },
  { name: 'metadata extended L2', args: ['-o', 'preallocation=metadata,extended_l2=on'], size: '1M', opts: { size: M, preallocation: 'metadata', extendedL2: true } },
  { name: 'full', args: ['-o', 'preallocation=full'], size: '1M', opts: { size: M, preallocation: 'full' } },
  { name: 'falloc 512', args: ['-o', 'preallocation=falloc,cluster_size=512'], size: '4M', opts: { size: 4 * M, preallocation: 'falloc', clusterSize: 512 } },
  { name: '1G at 512 (L1 over several refblocks)', args: ['-o', 'cluster_size=512'], size: '1G', opts: { size: 1024 * M, clusterSize: 512 } },
  { name: '16T (L1 over 4 clusters)', args: [], size: '16T', opts: { size: 16 * 2 ** 40 } },
  { name: 'size 0', args: [], size: '0', opts: { size: 0 } },
  { name: 'size 1001', args: [], size: '1001', opts: { size: 1001 } },
  { name: 'backing raw', args: ['-b', 'base.raw', '-F', 'raw'], size: '1M', opts: { size: M, backingFile: 'base.raw', backingFormat: 'raw' } },
  { name: 'backing qcow2, size from backing', args: ['-b', 'base.qcow2', '-F', 'qcow2'], size: '', opts: { backingFile: 'base.qcow2', backingFormat: 'qcow2' } },
  { name: 'backing + v2', args: ['-o', 'compat=0.10', '-b', 'base.qcow2', '-F', 'qcow2'], size: '1M', opts: { size: M, compat: '0.10', backingFile: 'base.qcow2', backingFormat: 'qcow2' } },
  { name: 'backing + metadata + extended L2', args: ['-o', 'preallocation=metadata,extended_l2=on', '-b', 'base.raw', '-F', 'raw'], size: '1M', opts: { size: M, preallocation: 'metadata', extendedL2: true, backingFile: 'base.raw', backingFormat: 'raw' } },
  { name: 'growth fallback 512 metadata', args: ['-o', 'cluster_size=512,preallocation=metadata'], size: '64M', opts: { size: 64 * M, clusterSize: 512, preallocation: 'metadata' }, layoutDiffers: true },
];

for (const c of CASES) {
  test(`create ${c.name}: same bytes (or info) as qemu-img, check clean, qemu-io r/w`, async () => {
    const ref = join(dir, `ref-${c.name.replace(/\W+/g, '_')}.qcow2`);
    const mine = join(dir, `qimg-${c.name.replace(/\W+/g, '_')}.qcow2`);
    const out = mustQemuImg(['create', '-f', 'qcow2', ...c.args, ref, ...(c.size ? [c.size] : [])], {}, dir);
    const r = await create(mine, { format: 'qcow2', ...c.opts });
    assert.is(r.formatting, out.trim().replace(ref, mine), 'Formatting line');
    if (!c.layoutDiffers) {
      assert.ok(readFileSync(ref).equals(readFileSync(mine)), 'byte-identical');
    } else {
      const info = (p: string) => JSON.parse(mustQemuImg(['info', '--output=json', p])) as Record<string, unknown>;
      const a = info(ref);
      const b = info(mine);
      for (const k of ['filename', 'actual-size', 'dirty-flag']) {
        delete a[k];
        delete b[k];
      }
      assert.equal(b, a);
    }
    const chk = qemuImg(['check', mine]);
    assert.is(chk.status, 0, chk.stdout + chk.stderr);
    const vsize = (JSON.parse(mustQemuImg(['info', '--output=json', mine])) as { 'virtual-size': number })['virtual-size'];
    const len = Math.min(65536, vsize);
    if (len > 0) mustQemuIo(['-c', `write -P 0x5a 0 ${len}`, '-c', `read -P 0x5a 0 ${len}`, mine]);
    const chk2 = qemuImg(['check', mine]);
    assert.is(chk2.status, 0, chk2.stdout + chk2.stderr);
  });
}

test('external data file (data_file_raw): same bytes, data file sized', async () => {
  const ref = join(dir, 'ref-df.qcow2');
  const mine = join(dir, 'qimg-df.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', `data_file=${join(dir, 'ref-df.raw')},data_file_raw=on`, ref, '1M']);
  await create(mine, { format: 'qcow2', size: M, dataFile: join(dir, 'qim-df.raw'), dataFileRaw: true });
  // Only the stored data-file names differ (same length).
  const a = readFileSync(ref);
  const b = readFileSync(mine);
  assert.is(b.length, a.length);
  assert.is(Buffer.compare(a.subarray(0, 0x70), b.subarray(0, 0x70)), 0);
  assert.is(Buffer.compare(a.subarray(0x200), b.subarray(0x200)), 0);
  assert.is(statSync(join(dir, 'qim-df.raw')).size, M);
  assert.is(qemuImg(['check', mine]).status, 0);
  mustQemuIo(['-c', 'write -P 0x5a 0 64k', '-c', 'read -P 0x5a 0 64k', mine]);
});

test('raw: sizes rounded to 512, full preallocation writes the blocks', async () => {
  const p = join(dir, 'r.raw');
  const r = await create(p, { format: 'raw', size: 1001 });
  assert.is(r.formatting, `Formatting '${p}', fmt=raw size=1001`);
  assert.is(statSync(p).size, 1024);
  const f = join(dir, 'full.raw');
  await create(f, { format: 'raw', size: M, preallocation: 'full' });
  assert.ok(statSync(f).blocks * 512 >= M);
});

test('1 TiB preallocation=metadata: fast, sparse, identical to qemu-img, check clean', async () => {
  const mine = join(dir, 'big.qcow2');
  const t0 = Date.now();
  await create(mine, { format: 'qcow2', size: 2 ** 40, preallocation: 'metadata' });
  const ms = Date.now() - t0;
  assert.ok(ms < 15000, `took ${ms} ms`);
  const st = statSync(mine);
  assert.ok(st.size > 2 ** 40, 'file spans the data');
  assert.ok(st.blocks * 512 < 512 * M, `sparse: ${st.blocks * 512} bytes allocated`);
  const chk = qemuImg(['check', mine]);
  assert.is(chk.status, 0, chk.stdout + chk.stderr);
  // The plan equals QEMU's allocation sequence (checked on the metadata QEMU would write).
  const p = validateQcow2(mine, { format: 'qcow2', size: 2 ** 40, preallocation: 'metadata' }, 2 ** 40);
  const plan = planQcow2(p);
  assert.is(plan.l2Tables[0], 4);
  assert.is(plan.refblocks.length, Math.ceil(plan.usedClusters / 32768));
});

test('plan: 512-byte clusters, 1 GiB: refblocks after the L1 table as QEMU places them', () => {
  const p = validateQcow2('x', { format: 'qcow2', size: 1024 * M, clusterSize: 512 }, 1024 * M);
  const plan = planQcow2(p);
  assert.equal(plan.refblocks, [2, 515, 516]);
  assert.is(plan.l1Cluster, 3);
  assert.is(plan.fileSize, 517 * 512);
});

test('plan: full preallocation moves the refcount table past L1 and reuses its old cluster', () => {
  const p = validateQcow2('x', { format: 'qcow2', size: 1024 * M, preallocation: 'full' }, 1024 * M);
  const plan = planQcow2(p);
  assert.is(plan.reftableCluster, 4);
  assert.equal(plan.l2Tables, [1, 16389]);
  assert.is(plan.fileSize, 16390 * 65536);
});

test('formattingLine: qemu-img order and spelling', () => {
  const line = formattingLine('a', {
    format: 'qcow2',
    size: 5,
    compat: 'v2',
    lazyRefcounts: true,
    preallocation: 'off',
    backingFile: 'b,c',
    backingFormat: 'raw',
    spelling: { lazy_refcounts: 'yes' },
  });
  assert.is(
    line,
    "Formatting 'a', fmt=qcow2 cluster_size=65536 extended_l2=off preallocation=off compression_type=zlib size=5 compat=v2 backing_file=b,,c backing_fmt=raw lazy_refcounts=yes refcount_bits=16",
  );
});

test('refusals: qemu-img wording, no file left behind', async () => {
  const cases: Array<[Partial<CreateOptions>, string]> = [
    [{ clusterSize: 1000 }, 'Cluster size must be a power of two between 512 and 2048k'],
    [{ refcountBits: 3 }, 'Refcount width must be a power of two and may not exceed 64 bits'],
    [{ compat: '0.10', refcountBits: 8 }, 'Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)'],
    [{ compat: '0.10', lazyRefcounts: true }, 'Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)'],
    [{ extendedL2: true, clusterSize: 8192 }, 'Extended L2 entries are only supported with cluster sizes of at least 16384 bytes'],
    [{ dataFileRaw: true }, 'data-file-raw requires data-file'],
    [{ size: 2 ** 51 + 512 }, "The image size is too large for file format 'qcow2' (try using a larger cluster size)"],
  ];
  for (const [o, msg] of cases) {
    const p = join(dir, 'refused.qcow2');
    try {
      await create(p, { format: 'qcow2', size: M, ...o });
      assert.unreachable('should refuse');
    } catch (err) {
      assert.instance(err, QimgError);
      assert.is((err as Error).message, `${p}: ${msg}`);
    }
    assert.not.ok(existsSync(p), 'no file');
  }
});

test.run();
