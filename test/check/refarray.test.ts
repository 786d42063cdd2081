// The checker's refcount array: nextNonZero against a plain scan, for every counter width and
// alignment of the range's ends.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { RefArray } from '../../src/qcow2/check/refarray.js';
import { Rng } from '../fuzz/mutate.js';

test('nextNonZero finds what a plain scan finds, at every width and alignment', () => {
  const rng = new Rng(7);
  for (let width = 0; width < 4; width++) {
    for (let round = 0; round < 40; round++) {
      const n = 1 + rng.int(300);
      const arr = new RefArray(n);
      for (let p = 0; p < width; p++) arr.promote();
      const marks = rng.int(4);
      for (let k = 0; k < marks; k++) arr.set(rng.int(n), width === 3 && rng.chance(0.3) ? 2 ** 40 : 1 + rng.int(200));
      for (let q = 0; q < 30; q++) {
        const from = rng.int(n + 1);
        const to = from + rng.int(n + 20 - from); // past the array's end too
        let want = to;
        for (let i = from; i < Math.min(to, n); i++) {
          if (arr.a[i]) {
            want = i;
            break;
          }
        }
        assert.is(arr.nextNonZero(from, to), want, `width ${width}, n ${n}, [${from}, ${to})`);
      }
    }
  }
});

test('nextNonZero follows the array when it is promoted or grows', () => {
  const arr = new RefArray(100);
  assert.is(arr.nextNonZero(0, 100), 100);
  arr.set(90, 1);
  assert.is(arr.nextNonZero(0, 100), 90);
  arr.promote();
  arr.set(50, 300);
  assert.is(arr.nextNonZero(0, 100), 50);
  arr.ensure(1000);
  arr.set(999, 1);
  assert.is(arr.nextNonZero(91, 1000), 999);
});

test.run();
