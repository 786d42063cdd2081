// The write commands against qemu-img on twin images, step by step (test/fuzz/ops.ts): a few
// fixed cases here; bench/ops-diff.ts runs many.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { join } from 'node:path';
import { tmpDir } from '../helpers.js';
import { runOpsCase } from './ops.js';

// Seed 1's first cases: v2 and v3 images, 512-byte to 64 KiB clusters, snapshots taken, reverted
// and deleted between writes, resizes, converts with and without -c, commits and rebases.
for (let i = 0; i < 4; i++) {
  test(`ops case 1/${i}: qimg and qemu-img agree at every step`, () => {
    const f = runOpsCase(join(tmpDir(), 'ops'), 1, i, 16);
    assert.ok(f === null || f.known !== undefined, f ? `step ${f.step}: ${f.op}\n${f.what}\n${f.log.join('\n')}` : '');
  });
}

test.run();
