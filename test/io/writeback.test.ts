// Background writeback: StagedFile asks for it after enough bytes, never when not durable, and
// NodeFile runs it on the thread pool without losing data or the order of later flushes.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { NodeFile } from '../../src/qcow2/io/file.js';
import { MemoryFile } from '../../src/qcow2/io/memory-file.js';
import { StagedFile } from '../../src/qcow2/io/staged-file.js';
import { tmpDir } from '../helpers.js';

const MiB = 1024 * 1024;

/** A MemoryFile that counts the writeback requests it gets. */
class CountingFile extends MemoryFile {
  hints = 0;
  startWriteback(): void {
    this.hints++;
  }
}

test('StagedFile: one writeback request per 32 MiB written since the last flush; none when not durable', () => {
  const chunk = new Uint8Array(MiB).fill(7);
  const inner = new CountingFile();
  const f = new StagedFile(inner);
  for (let i = 0; i < 100; i++) f.write(chunk, i * MiB);
  assert.is(inner.hints, 3);
  f.flush(); // a flush starts the count again
  for (let i = 0; i < 31; i++) f.write(chunk, i * MiB);
  assert.is(inner.hints, 3);
  f.write(chunk, 31 * MiB);
  f.write(chunk, 32 * MiB);
  assert.is(inner.hints, 4);
  // Every byte arrived, in order, hints or not.
  f.flush();
  assert.is(inner.bytes().length, 100 * MiB);
  assert.ok(inner.bytes().every((b) => b === 7));

  const quiet = new CountingFile();
  const nf = new StagedFile(quiet, false);
  for (let i = 0; i < 100; i++) nf.write(chunk, i * MiB);
  assert.is(quiet.hints, 0);
});

test('NodeFile: writebacks run in the background; settle() waits for all of them; data and flush unaffected', async () => {
  const path = join(tmpDir(), 'wb.bin');
  writeFileSync(path, new Uint8Array(0));
  const f = NodeFile.open(path, true);
  const chunk = new Uint8Array(4 * MiB);
  for (let i = 0; i < 4; i++) {
    f.write(chunk.fill(i + 1), i * chunk.length);
    f.startWriteback(); // overlapping requests are allowed
  }
  f.flush();
  await f.settle();
  await f.settle(); // nothing in flight: resolves at once
  f.close();
  const back = readFileSync(path);
  assert.is(back.length, 16 * MiB);
  for (let i = 0; i < 4; i++) assert.is(back[i * 4 * MiB + 123], i + 1);

  const ro = NodeFile.open(path, false);
  ro.startWriteback(); // read-only: nothing to do
  await ro.settle();
  ro.close();
});

test.run();
