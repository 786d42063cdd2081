// qimg check against qemu-img check 7.2: build-then-poke images of several geometries, every
// damage kind, the same stdout / stderr / JSON / exit code. This file: the first three
// geometries and the command-line cases; check-more.test.ts the other three;
// check-repair.test.ts the repairs.
import { test } from 'uvu';
import { writeFileSync } from 'node:fs';
import { qemuImg } from '../helpers.js';
import { asQimg, qimgCheck } from './cli.js';
import { bases, damaged, findingsTests, same, scratch } from './cases.js';

findingsTests(bases([0, 1, 2]));

test('quiet, -f, raw and missing files behave like qemu-img', async () => {
  const b = bases([0])[0]!;
  const leak = damaged(b, 1)!;
  same(await qimgCheck(['-q', leak]), asQimg(qemuImg(['check', '-q', leak])), '-q');
  same(await qimgCheck(['-f', 'qcow2', leak]), asQimg(qemuImg(['check', '-f', 'qcow2', leak])), '-f qcow2');
  const raw = scratch('plain.raw');
  writeFileSync(raw, new Uint8Array(65536));
  same(await qimgCheck([raw]), asQimg(qemuImg(['check', raw])), 'raw');
  same(await qimgCheck(['-f', 'qcow2', raw]), asQimg(qemuImg(['check', '-f', 'qcow2', raw])), 'raw as qcow2');
  same(await qimgCheck(['-f', 'raw', b.path]), asQimg(qemuImg(['check', '-f', 'raw', b.path])), 'qcow2 as raw');
  const missing = scratch('nope.qcow2');
  same(await qimgCheck([missing]), asQimg(qemuImg(['check', missing])), 'missing');
});

test.run();
