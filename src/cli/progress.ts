// qemu-img's progress line: "    (12.34/100%)" redrawn in place with a carriage return.

export function progressBar(done: number, total: number): string {
  const pct = total === 0 ? 100 : (done / total) * 100;
  return `    (${pct.toFixed(2)}/100%)\r`;
}
