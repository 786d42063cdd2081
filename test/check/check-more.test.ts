// qimg check against qemu-img check 7.2 on the other three geometries (v2, 512-byte clusters
// with 64-bit refcounts, 1-bit refcounts): every damage kind, human and JSON.
import { test } from 'uvu';
import { bases, findingsTests } from './cases.js';

findingsTests(bases([3, 4, 5]));

test.run();
