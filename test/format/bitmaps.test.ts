// Bitmap directory entries on a hand-written two-entry directory, and qemu-img's flag names.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { bytes, text } from './literal.js';
import { bitmapFlagNames, decodeBitmapDirectory, BME_FLAG_AUTO, BME_FLAG_IN_USE } from '../../src/qcow2/format/bitmaps.js';
import { QimgError } from '../../src/qcow2/errors.js';


const DIR_OFFSET = 0x60000;

const DIRECTORY = bytes(
  // entry 0
  [0, 0, 0, 0, 0, 0x05, 0, 0], //             0 bitmap_table_offset 0x50000
  [0, 0, 0, 0x01], //                         8 bitmap_table_size 1
  [0, 0, 0, 0x01], //                        12 flags: in_use
  [0x01], //                                 16 type 1 (dirty tracking)
  [0x10], //                                 17 granularity_bits 16
  [0, 0x02], //                              18 name_size 2
  [0, 0, 0, 0], //                           20 extra_data_size 0
  text('b0'), //                             24 name "b0"
  [0, 0, 0, 0, 0, 0], //                     26 padding to 32
  // entry 1
  [0, 0, 0, 0x01, 0, 0x07, 0, 0], //         32 bitmap_table_offset 0x100070000 (above 2^32)
  [0, 0, 0, 0x02], //                        40 bitmap_table_size 2
  [0, 0, 0, 0x02], //                        44 flags: auto
  [0x01], //                                 48 type 1
  [0x14], //                                 49 granularity_bits 20
  [0, 0x0a], //                              50 name_size 10
  [0, 0, 0, 0x04], //                        52 extra_data_size 4
  [0xaa, 0xbb, 0xcc, 0xdd], //               56 extra data (skipped)
  text('bitmap-one'), //                     60 name "bitmap-one"
  [0, 0], //                                 70 padding to 72
);

test('two-entry directory decoded', () => {
  assert.is(DIRECTORY.length, 72);
  const entries = decodeBitmapDirectory(DIRECTORY, 2, DIR_OFFSET);
  assert.equal(entries, [
    { bitmapTableOffset: 0x50000, bitmapTableSize: 1, flags: BME_FLAG_IN_USE, type: 1, granularityBits: 16, name: 'b0' },
    { bitmapTableOffset: 0x100070000, bitmapTableSize: 2, flags: BME_FLAG_AUTO, type: 1, granularityBits: 20, name: 'bitmap-one' },
  ]);
  assert.equal(bitmapFlagNames(entries[0]!.flags), ['in-use']);
  assert.equal(bitmapFlagNames(entries[1]!.flags), ['auto']);
});

test('bitmapFlagNames: qemu-img order, unknown bits not named', () => {
  assert.equal(bitmapFlagNames(0), []);
  assert.equal(bitmapFlagNames(BME_FLAG_IN_USE | BME_FLAG_AUTO), ['in-use', 'auto']);
  assert.equal(bitmapFlagNames(0b111), ['in-use', 'auto']);
  assert.equal(bitmapFlagNames(0b100), []);
});

function badImage(fn: () => unknown, message: string): void {
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  if (caught === undefined) assert.unreachable(`expected "${message}"`);
  assert.instance(caught, QimgError);
  assert.is((caught as QimgError).code, 'BAD_IMAGE');
  assert.is((caught as Error).message, message);
}

test('truncated or malformed directory: errors name the directory and entry', () => {
  badImage(() => decodeBitmapDirectory(DIRECTORY.subarray(0, 50), 2, DIR_OFFSET), 'Bitmap directory at 0x60000 is truncated (entry 1)');
  badImage(() => decodeBitmapDirectory(DIRECTORY, 3, DIR_OFFSET), 'Bitmap directory at 0x60000 is truncated (entry 2)');
  // Entry 1's name runs past the end.
  badImage(() => decodeBitmapDirectory(DIRECTORY.subarray(0, 65), 2, DIR_OFFSET), 'Bitmap directory at 0x60000: entry 1 is malformed');
  // name_size 1024 is over QEMU's limit.
  const long = DIRECTORY.slice();
  new DataView(long.buffer).setUint16(50, 1024);
  badImage(() => decodeBitmapDirectory(long, 2, DIR_OFFSET), 'Bitmap directory at 0x60000: entry 1 is malformed');
});

test.run();
