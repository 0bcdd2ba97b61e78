"""Progress that works with and without a terminal: a tqdm bar on a TTY; elsewhere (nohup, slurm, CI, a log
file) a plain line every ~5% of the run with step, loss, accuracy, steps/s and ETA."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class Progress:
    def __init__(self, start: int, total: int, desc: str, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.start, self.total, self.desc, self.enabled = start, total, desc, enabled
        self.interactive = enabled and self.stream.isatty()
        self.bar = tqdm(initial=start, total=total, desc=desc, file=self.stream) if self.interactive else None
        self.every, self.began = max(1, total // 20), time.perf_counter()

    def update(self, step: int, **values: float) -> None:
        """After step ``step`` (1-based) with its metrics."""
        if not self.enabled:
            return
        text = {k: f"{v:.4f}" if isinstance(v, float) else str(v) for k, v in values.items()}
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(text)
            return
        if step % self.every and step != self.total:
            return
        done = step - self.start
        rate = done / max(time.perf_counter() - self.began, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        fields = " ".join(f"{k} {v}" for k, v in text.items())
        line = f"{self.desc}: step {step}/{self.total} {fields} {rate:.2f} steps/s ETA {eta:.0f}s"
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
