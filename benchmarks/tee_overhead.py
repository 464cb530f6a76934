"""100k printed lines through tsdia's console tee vs the same lines printed straight into a file.

    python benchmarks/tee_overhead.py [--runs 7] [--lines 100000]

Goal: <= 1.1x.

Each measurement is a fresh process whose stdout is a file (as under Slurm, where the console is the job's
`slurm-%j.out`):

- **file** (the baseline): `print()` 100k log-like lines (~80 bytes) with stdout redirected to a file,
  then flush.
- **tee**: the same, after `setup_file_logger(log)`: every byte goes through the fd-level pipe to the
  tee's pump thread, which writes it to the console file *and* to the log file. Timed from just before
  `setup_file_logger` to after `tee.close()` returned (the pipe drained, both files written).
- **tee-proposed** (information only, with `--proposed`): the tee with a prototype of the suggested
  faster pump patched in (`patch_proposed_pump`): what the fix would buy.
- **pipe-cat** (information only, with `--proposed`): plain prints into a pipe that a `cat` process drains
  into the console file: the floor for any tee that works through a pipe.
- **file-linebuf** (information only): the baseline with stdout line-buffered, which is what the tee
  switches Python's streams to (so stdout and stderr interleave in order); it separates the cost of
  one `write()` per line from the cost of the pipe and pump.

Each child times itself (`perf_counter`) around the printing, so interpreter start-up and imports are
not counted. Runs are interleaved (a rotated order per round) and the median of each is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import tempfile
import time
from pathlib import Path

from common import child_env, fmt_runs, median, ratio_line, run_logged

VARIANTS = ("file", "tee", "file-linebuf")
PROPOSED = "tee-proposed"  # --proposed: the suggested pump (see patch_proposed_pump), information only
PIPE = "pipe-cat"  # --proposed: plain prints into a pipe that `cat` drains: the floor of any pipe-based tee


def patch_proposed_pump() -> None:
    """A prototype of the suggested change to `ConsoleTee._pump`, to measure it (not tsdia's code).

    Today the pump wakes for every few lines a writer puts in the 64 KiB pipe, and each wake-up takes the
    GIL from the printing thread. The proposal: a 1 MiB pipe (F_SETPIPE_SZ), and after `select` says data
    is there, sleep 1 ms so more arrives, then read everything (up to 1 MiB) at once: fewer, larger
    wake-ups. A line's echo on the console is delayed by at most ~1 ms.
    """
    import fcntl
    import os
    import select

    from tsdia.training import tee

    set_pipe_size = getattr(fcntl, "F_SETPIPE_SZ", 1031)

    def pump(self: tee.ConsoleTee, read_end: int, console: int, collapser: tee._LineCollapser) -> None:
        with contextlib.suppress(OSError):  # a smaller pipe only means more wake-ups
            fcntl.fcntl(read_end, set_pipe_size, 1 << 20)
        try:
            while True:
                ready, _, _ = select.select([read_end], [], [], tee._POLL_S)
                if not ready:
                    if self._stopping.is_set():
                        break
                    continue
                time.sleep(0.001)
                data = os.read(read_end, 1 << 20)
                if not data:
                    break
                if self.echo:
                    tee._write_all(console, data)
                collapser.feed(data)
        finally:
            collapser.flush_pending()
            os.close(read_end)

    tee.ConsoleTee._pump = pump  # type: ignore[method-assign]


def child(variant: str, lines: int, log_path: Path, result_path: Path) -> None:
    text = "step {:>7d}: loss=0.123456 lr=1.00e-03 grad_norm=0.9876 samples/s=1234.5 (epoch 3) ok"
    tee = None
    if variant.startswith("tee"):
        from tsdia.training.logging_utils import setup_file_logger

        if variant == PROPOSED:
            patch_proposed_pump()
    started = time.perf_counter()
    if variant.startswith("tee"):
        tee = setup_file_logger(log_path)
    elif variant == "file-linebuf":
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    for i in range(lines):
        print(text.format(i))
    sys.stdout.flush()
    if tee is not None:
        tee.close()
    elapsed = time.perf_counter() - started
    result_path.write_text(repr(elapsed))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=7, help="runs of each variant, interleaved")
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument(
        "--proposed", action="store_true", help="also measure a prototype of the suggested faster pump"
    )
    parser.add_argument("--child", choices=(*VARIANTS, PROPOSED, PIPE), help=argparse.SUPPRESS)
    parser.add_argument("--child-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        out = Path(args.child_dir)
        child(args.child, args.lines, out / "training.log", out / "elapsed.txt")
        return

    variants = (*VARIANTS, PROPOSED, PIPE) if args.proposed else VARIANTS
    times: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="tsdia-bench-tee-") as tmp_name:
        tmp = Path(tmp_name)
        env = child_env(tmp, threads=1)
        for r in range(args.runs + 1):  # round 0 warms the page cache and .pyc files, and is dropped
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for variant in order:
                out = tmp / f"{variant}-{r}"
                out.mkdir()
                cmd = [sys.executable, __file__, "--child", variant, "--child-dir", str(out)]
                if variant == PIPE:  # the child's stdout is a pipe; cat writes the console file
                    quoted = " ".join(shlex.quote(c) for c in cmd)
                    cmd = ["sh", "-c", f"{quoted} | cat > {shlex.quote(str(out / 'console.txt'))}"]
                    run_logged(cmd, env, out / "stderr.txt")
                else:
                    run_logged(cmd, env, out / "console.txt")
                console_lines = (out / "console.txt").read_bytes().count(b"\n")
                if console_lines != args.lines:
                    sys.exit(f"{variant}: the console got {console_lines} lines, expected {args.lines}")
                if variant.startswith("tee"):
                    logged = (out / "training.log").read_bytes().count(b"\n")
                    if logged != args.lines:
                        sys.exit(f"{variant}: the log file got {logged} lines, expected {args.lines}")
                if r:
                    times[variant].append(float((out / "elapsed.txt").read_text()))
    medians = {v: median(times[v]) for v in variants}
    print(f"{args.lines} lines, {args.runs} interleaved runs each")
    print(f"{'variant':13s} {'median s':>9s}  runs (s)")
    for v in variants:
        print(f"{v:13s} {medians[v]:9.3f}  {fmt_runs(times[v], digits=3)}")
    print(ratio_line("file-linebuf/file", "info", medians["file-linebuf"] / medians["file"]))
    if args.proposed:
        print(ratio_line(f"{PROPOSED}/file", "info", medians[PROPOSED] / medians["file"]))
        print(ratio_line(f"{PIPE}/file", "info", medians[PIPE] / medians["file"]))
    print(ratio_line("tee/file", "<= 1.1x", medians["tee"] / medians["file"]))


if __name__ == "__main__":
    main()
