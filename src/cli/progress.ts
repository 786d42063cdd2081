// qemu-img's progress line: "    (12.34/100%)" redrawn in place with a carriage return.

import { writeStdout } from './output.js';

export function progressBar(done: number, total: number): string {
  const pct = total === 0 ? 100 : (done / total) * 100;
  return `    (${pct.toFixed(2)}/100%)\r`;
}

/** A progress callback drawing the line each time the whole percentage changes (undefined when hidden). */
export function percentReporter(show: boolean): ((done: number, total: number) => void) | undefined {
  if (!show) return undefined;
  let lastPct = -1;
  return (done, total) => {
    const pct = Math.floor((done / total) * 100);
    if (pct !== lastPct) writeStdout(progressBar(done, total));
    lastPct = pct;
  };
}
