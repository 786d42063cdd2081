// bin/qimg.js as an installed qimg runs it: executed through its shebang.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { join } from 'node:path';
import { FIXTURES, QIMG_BIN, qemuImg, qimg, run } from '../helpers.js';

const DEMO = join(FIXTURES, 'demo.qcow2');
// Node warns on stderr when it cannot load the bundle NODE_EXTRA_CA_CERTS names: a missing file
// shows whether the variable reached Node at all.
const MISSING_CERTS = { NODE_EXTRA_CA_CERTS: '/nonexistent/qimg-test-ca.pem' };

test('the shebang drops NODE_EXTRA_CA_CERTS: no certificate bundle is read, output unchanged', () => {
  const r = qimg(['info', DEMO], MISSING_CERTS);
  assert.is(r.status, 0, r.stderr);
  assert.is(r.stderr, '');
  assert.is(r.stdout, qemuImg(['info', '-U', DEMO]).stdout);
  // The same file run by `node` directly keeps the variable, and Node says so: the check above can fail.
  const direct = run(process.execPath, [QIMG_BIN, 'info', DEMO], MISSING_CERTS);
  assert.is(direct.status, 0, direct.stderr);
  assert.match(direct.stderr, /Ignoring extra certs from `\/nonexistent\/qimg-test-ca\.pem`/);
  assert.is(direct.stdout, r.stdout);
});

test('other variables still reach qimg (TZ, LC_ALL) through the shebang', () => {
  const utc = qimg(['snapshot', '-l', DEMO], { TZ: 'UTC' });
  const tokyo = qimg(['snapshot', '-l', DEMO], { TZ: 'Asia/Tokyo' });
  assert.is(utc.status, 0, utc.stderr);
  assert.is(tokyo.status, 0, tokyo.stderr);
  // Snapshot dates print in local time, as qemu-img prints them: a different zone moves them.
  assert.is.not(utc.stdout, tokyo.stdout);
  assert.is(tokyo.stdout, qemuImg(['snapshot', '-l', DEMO], { TZ: 'Asia/Tokyo' }).stdout);
});

test.run();
