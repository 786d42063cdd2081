#!/usr/bin/env -S -u NODE_EXTRA_CA_CERTS node
// Entry point: the CLI lives in the compiled dist/ tree (built by `npm install` via `prepare`).
//
// The shebang drops NODE_EXTRA_CA_CERTS: Node 20 reads and parses that certificate bundle at
// start-up, before any of our code runs (60-100 ms on a 2-CPU machine, more than the rest of
// qimg's start-up), and qimg never opens a network connection. GNU env >= 8.30 and BSD env
// understand -S and -u. Run as `node bin/qimg.js` the line is ignored and nothing changes.
//
// The CLI comes from the one-script bundle when it is there and current (bundle-loader.js says
// why), else from the module tree.
'use strict';
const { loadBundle } = require('./bundle-loader.js');

const bundled = loadBundle();
(bundled ? Promise.resolve(bundled.exports) : import('../dist/src/cli/main.js')).then((m) => m.main(process.argv.slice(2)));
