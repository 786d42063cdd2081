// hostZero and HoleCache on real sparse files: which host bytes read as zero without a read.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { closeSync, ftruncateSync, openSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { tmpDir } from '../helpers.js';
import { HoleCache, hostZero } from '../../src/qcow2/engine/holes.js';
import { NodeFile } from '../../src/qcow2/io/file.js';
import { MemoryFile } from '../../src/qcow2/io/memory-file.js';

const MiB = 1024 * 1024;
const dir = tmpDir('qimg-holes-');

/** 8 MiB + 100 bytes: a hole, data at [2 MiB, 3 MiB), a hole, data in the last partial sector. */
function sparse(): string {
  const path = join(dir, `sparse${Math.random().toString(36).slice(2)}`);
  const fd = openSync(path, 'w');
  writeSync(fd, Buffer.alloc(MiB, 0x11), 0, MiB, 2 * MiB);
  writeSync(fd, Buffer.alloc(100, 0x22), 0, 100, 8 * MiB);
  ftruncateSync(fd, 8 * MiB + 100);
  closeSync(fd);
  return path;
}

test('hostZero: holes and the end of the file read as zero, data as data, each for its run', () => {
  const f = NodeFile.open(sparse(), false);
  try {
    assert.equal(hostZero(f, 0, 16 * MiB), { zero: true, length: 2 * MiB });
    assert.equal(hostZero(f, MiB, 512), { zero: true, length: 512 });
    assert.equal(hostZero(f, 2 * MiB, 16 * MiB), { zero: false, length: MiB });
    assert.equal(hostZero(f, 3 * MiB, 16 * MiB), { zero: true, length: 5 * MiB });
    // The last data reaches the end of the file: data, to the end.
    assert.equal(hostZero(f, 8 * MiB, 16 * MiB), { zero: false, length: 100 });
    // At or past the end: zero, all of what was asked.
    assert.equal(hostZero(f, 8 * MiB + 100, 3 * MiB), { zero: true, length: 3 * MiB });
    assert.equal(hostZero(f, 64 * MiB, 4096), { zero: true, length: 4096 });
  } finally {
    f.close();
  }
});

test('HoleCache: answers for whole runs, kept per file; a file that cannot tell is data', () => {
  const path = sparse();
  const f = NodeFile.open(path, false);
  const g = NodeFile.open(path, false);
  let asked = 0;
  const dataRun = f.dataRun.bind(f);
  f.dataRun = (pos) => {
    asked++;
    return dataRun(pos);
  };
  try {
    const holes = new HoleCache();
    assert.equal(holes.probe(f, 0, 64 * 1024), { zero: true, length: 64 * 1024 });
    assert.equal(holes.probe(f, 64 * 1024, 4 * MiB), { zero: true, length: 2 * MiB - 64 * 1024 });
    assert.is(asked, 1, 'the second probe inside the same hole asked the file again');
    assert.equal(holes.probe(f, 2 * MiB + 4096, 64 * 1024), { zero: false, length: 64 * 1024 });
    assert.equal(holes.probe(f, 2 * MiB + 8192, 8 * MiB), { zero: false, length: MiB - 8192 });
    assert.is(asked, 2);
    assert.equal(holes.probe(g, 2 * MiB, 16 * MiB), { zero: false, length: MiB }, 'another file is asked on its own');
    assert.equal(holes.probe(f, 9 * MiB, 4096), { zero: true, length: 4096 }, 'past the end');
    const mem = new MemoryFile(new Uint8Array(MiB), 'mem', false);
    assert.equal(holes.probe(mem, 0, 4096), { zero: false, length: 4096 });
    assert.equal(holes.probe(mem, 4096, 8192), { zero: false, length: 8192 });
  } finally {
    f.close();
    g.close();
  }
});

test('HoleCache: a host offset past 2^53 (a damaged entry) reads as zero, every answer at least 1 byte long', () => {
  const f = NodeFile.open(sparse(), false);
  try {
    const holes = new HoleCache();
    const far = 2 ** 54;
    // Before the fix: the run's end was host + (2^53 - 1 - host), below host: an endless loop.
    assert.equal(holes.probe(f, far, 65536), { zero: true, length: 65536 });
    assert.equal(holes.probe(f, far + 65536, 65536), { zero: true, length: 65536 });
    assert.equal(holes.probe(f, 2 * MiB, 65536), { zero: false, length: 65536 });
    for (const host of [0, MiB, 2 * MiB, 3 * MiB - 1, 8 * MiB + 99, 2 ** 53, 2 ** 60]) {
      const p = holes.probe(f, host, 4096);
      assert.ok(p.length >= 1 && p.length <= 4096, `host ${host}: length ${p.length}`);
    }
  } finally {
    f.close();
  }
});

test.run();
