#!/usr/bin/env node
// Entry point: the CLI lives in the compiled dist/ tree (built by `npm install` via `prepare`).
import('../dist/src/cli/main.js').then((m) => m.main(process.argv.slice(2)));
