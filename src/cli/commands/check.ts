// `qimg check [-f FMT] [--output=human|json] [-r leaks|all] [-q] [-U] [-p] FILE...`
//
// One file: exactly qemu-img's stdout, stderr and exit code. Several files (a qimg extension):
// checked concurrently on worker threads; reports in argument order. Human: each report is
// preceded by `image: FILE` and separated from the next by one blank line; stderr findings are
// prefixed with `FILE: `. JSON: an array of the report objects. Exit code: the worst of the
// files, ordered 1 (check failed) > 63 (format not checkable) > 2 (corruptions) > 3 (leaks) > 0.

import { QimgError } from '../../qcow2/errors.js';
import { check, renderCheckHuman, renderCheckJson, renderCheckJsonArray, renderCheckStderr, type CheckOptions } from '../../qcow2/check/index.js';
import { checkMany, worstExitCode } from '../../qcow2/check/many.js';
import { flag, imageFormat, last, outputFormat, parseArgs, usage } from '../args.js';
import { progressBar } from '../progress.js';

export async function run(argv: string[]): Promise<number> {
  const p = parseArgs('check', argv, [
    { key: 'format', short: 'f', long: ['format'], value: true },
    { key: 'force-share', short: 'U', long: ['force-share'] },
    { key: 'output', long: ['output'], value: true },
    { key: 'repair', short: 'r', value: true },
    { key: 'quiet', short: 'q' },
    { key: 'progress', short: 'p' },
    { key: 'chunk-size', long: ['chunk-size'], value: true },
  ]);
  if (p.positionals.length === 0) throw usage('check', 'Expecting one image file name');
  const output = outputFormat('check', p);
  const r = last(p, 'repair');
  if (r !== undefined && r !== 'leaks' && r !== 'all') throw usage('check', `Unknown option value for -r (expecting 'leaks' or 'all'): ${r}`);
  const quiet = flag(p, 'quiet');
  const chunk = last(p, 'chunk-size');
  const opts: CheckOptions = {
    format: imageFormat(p, p.positionals[0]!),
    repair: r as 'leaks' | 'all' | undefined,
    forceShare: flag(p, 'force-share'),
    chunkBytes: chunk ? Number(chunk) : undefined,
  };
  if (opts.forceShare && opts.repair) throw new QimgError('USAGE', 'force-share=on can only be used with read-only images');
  const files = p.positionals;
  if (files.length === 1) {
    const showProgress = flag(p, 'progress') && !quiet && process.stderr.isTTY === true;
    if (showProgress) opts.progress = (d, t) => process.stderr.write(progressBar(d, t));
    const rep = await check(files[0]!, opts);
    if (showProgress) process.stderr.write('\n');
    process.stderr.write(rep.messages.map((m) => m + '\n').join(''));
    process.stdout.write(output === 'json' ? (quiet ? '' : renderCheckJson(rep)) : renderCheckHuman(rep, quiet));
    if (rep.error) process.stderr.write(`qimg: ${rep.error}\n`);
    return rep.exitCode;
  }
  const reps = await checkMany(files, opts);
  if (output === 'json') {
    for (const rep of reps) process.stderr.write(renderCheckStderr({ ...rep, error: null }).replace(/^(?=.)/gm, `${rep.filename}: `));
    if (!quiet) process.stdout.write(renderCheckJsonArray(reps));
    for (const rep of reps) if (rep.error) process.stderr.write(`qimg: ${rep.error.startsWith('Could not open') ? '' : rep.filename + ': '}${rep.error}\n`);
  } else {
    let first = true;
    for (const rep of reps) {
      process.stderr.write(renderCheckStderr({ ...rep, error: null }).replace(/^(?=.)/gm, `${rep.filename}: `));
      if (!quiet) {
        process.stdout.write(`${first ? '' : '\n'}image: ${rep.filename}\n${renderCheckHuman(rep)}`);
        first = false;
      }
      if (rep.error) process.stderr.write(`qimg: ${rep.error.startsWith('Could not open') ? '' : rep.filename + ': '}${rep.error}\n`);
    }
  }
  return worstExitCode(reps.map((x) => x.exitCode));
}
