"""What a run shows on the terminal: the progress bar inside an epoch and the line after it."""
from __future__ import annotations

import sys
import threading
import time
from typing import List, Optional

UPDATES = 20  # per epoch; each reads the running loss: a host sync on a GPU


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def epoch_line(e, total: Optional[int], done: int, walls: List[float], best: bool) -> str:
    """``[search] epoch 12 stage 0 lr 0.1 | train loss 1.2 acc 45.6% | val ... | 30.2 s``."""
    eta = "" if total is None or not walls else \
        f" | ETA {duration((total - done) * sum(walls) / len(walls))}"
    ips = f"{e.images_per_s:.0f} img/s" if e.images_per_s else "- img/s"
    hit = " (compile cache hit)" if e.cache_outcome == "hit" else ""
    compiled = f" | + {e.compile_seconds:.0f} s compiling{hit}" \
        if e.compile_seconds >= 0.5 else ""
    of = f"/{total}" if total is not None else ""
    return (f"[{e.phase}] epoch {e.epoch}{of} stage {e.stage} lr {e.lr:g} | "
            f"train loss {e.train_loss:.4f} acc {100 * e.train_acc:.2f}% | "
            f"{e.eval_split} loss {e.eval_loss:.4f} acc {100 * e.eval_acc:.2f}% | "
            f"{e.seconds:.1f} s {ips}{eta}{compiled}" + (" | best" if best else "")
            + ("" if e.decision == "continue" else f" | {e.decision}"))


class Progress:
    """A one-line progress bar: batches, images/s, ETA, loss; ``compiling… N s`` before."""

    def __init__(self, label: str, total: int, backend):
        self.label, self.total, self.backend = label, total, backend
        self.t0 = time.perf_counter()
        self.every = max(1, total // UPDATES)
        self.first = None  # (done, images, time) after the first step
        self._stepped = threading.Event()
        self._ticker = threading.Thread(target=self._tick, daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stepped.wait(1.0):
            hit = getattr(self.backend, "cache_outcome", None) == "hit"
            doing = "compile cache hit" if hit else "compiling"
            self._write(f"{self.label} {doing}\u2026 {time.perf_counter() - self.t0:.0f} s")

    def _write(self, text: str) -> None:
        sys.stderr.write(f"\r  {text}\033[K" if text else "\r\033[K")
        sys.stderr.flush()

    def due(self, done: int) -> bool:
        return done == 1 or done % self.every == 0 or done == self.total

    def show(self, done: int, images: int, loss: float) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (done, images, now)
            self._stop_ticker()
        d0, i0, t0 = self.first
        elapsed = max(now - t0, 1e-9)
        rate = f"{(images - i0) / elapsed:.0f} img/s" if done > d0 else "- img/s"
        eta = f"ETA {duration(elapsed / (done - d0) * (self.total - done))}" if done > d0 \
            else "ETA -"
        filled = 20 * done // self.total
        bar = "#" * filled + "." * (20 - filled)
        self._write(f"{self.label} [{bar}] {done}/{self.total} {rate} {eta} loss {loss:.4f}")

    def _stop_ticker(self) -> None:
        self._stepped.set()
        self._ticker.join()

    def close(self) -> None:
        self._stop_ticker()
        self._write("")
