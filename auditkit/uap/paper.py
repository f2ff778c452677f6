"""The paper's UAP loop (Moosavi-Dezfooli et al. 2017 with an FGSM inner step; Hirano & Takemoto 2020).

See docs/method.md for the loop and docs/engine.md for how it is made fast without changing its result.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .backends import Call, Cell, Crafting, LoopAttack, statuses
from .base import AttackSettings, CraftResult, ProgressFn

MAX_WINDOW = 256  # speculative look-ahead, images per batched check
WALK = 32  # most images one walk call visits where steps are accepted often
MIN_PROBE = 6  # batched step probes only where about this many steps are rejected per accepted one


@dataclass
class _LookAhead:
    """Running estimates that size the speculative look-ahead: the share of checked images not yet fooled, and the
    share of steps accepted. Probing about 1/accept unfooled images finds the next accepted step in one call."""

    unfooled: float = 0.5
    accept: float = 0.5

    def probe(self, cap: int) -> int:
        """Unfooled images to probe in one batched call; 1 (walk through the images instead) where steps are
        accepted so often that a batched probe would mostly be redone by the single-image step after it."""
        run = round(1.0 / max(self.accept, 1e-3))
        return int(min(cap, run)) if run >= MIN_PROBE else 1

    def window(self, probe: int) -> int:
        return int(min(MAX_WINDOW, max(probe, round(probe / max(self.unfooled, 1e-3)))))

    def checked(self, n: int, unfooled: int) -> None:
        self.unfooled = _running(self.unfooled, n, unfooled)

    def stepped(self, n: int, accepted: int) -> None:
        self.accept = _running(self.accept, n, accepted)


def _running(estimate: float, n: int, count: int) -> float:
    """An exponential running share updated with `count` of `n` new observations, each weighing 5%."""
    return estimate + (1.0 - 0.95**n) * (count / n - estimate) if n else estimate


class PaperUAP(LoopAttack):
    """The paper's UAP loop (Moosavi-Dezfooli et al. 2017 with an FGSM inner step; Hirano & Takemoto 2020).

    `speculative=True` evaluates a window of upcoming images against the current rho in one batched call: which are
    already fooled, and, for the first unfooled ones, whether their step would be accepted. rho changes only at an
    accepted step, so every image before the first acceptance is done (skipped or rejected) exactly as the plain
    loop would; the accepted image itself is then stepped by the plain loop's single-image graph, and the window
    resumes after it. Statuses stay known until rho moves (the per-pass evaluation supplies them for the start of
    the next pass), and window and probe sizes follow running estimates of how many images are unfooled and how
    many steps are accepted. Where most steps are accepted, batched checks would mostly be redone after the next
    step: the loop then walks through the next WALK images in one call of that graph instead, visiting them in
    order as the plain loop does (one image a call), past the images it knows are fooled until rho moves.
    The result equals the plain loop's. Both stop after a pass that accepts no step (every
    later pass would repeat it), as well as at a crafting rate of 1 - delta or after max_iter passes;
    `stop_at_fixed_point=False` runs the remaining passes anyway (same UAP; a benchmark compares equal passes so).
    """

    def __init__(self, settings: AttackSettings, progress: ProgressFn | None = None, *, speculative: bool = True,
                 stop_at_fixed_point: bool = True, probe_batch: int = 64):
        super().__init__(settings, progress)
        self.speculative, self.stop_at_fixed_point, self.probe_batch = speculative, stop_at_fixed_point, probe_batch

    def crafting(self, cell: Cell, n: int, rho: np.ndarray, rng: np.random.Generator) -> Crafting:
        s = self.settings
        rates: list[float] = []
        visited = steps = 0
        start = time.perf_counter()
        # status[j]: whether image j is fooled under the current rho, where valid[j]. The plain loop keeps none;
        # the speculative one reuses what its look-ahead saw in the per-pass evaluation and the next pass.
        status, valid = np.zeros(n, bool), np.zeros(n, bool)
        ahead = _LookAhead()
        for pass_no in range(1, s.max_iter + 1):
            if self.speculative and pass_no == 1:
                yield from self._complete(cell, rho, status, valid)
            order = rng.permutation(n).astype(np.int32)
            rho, pass_steps, moved = yield from self._one_pass(cell, order, rho, pass_no, status, valid, ahead)
            steps += pass_steps
            visited += n
            yield from self._complete(cell, rho, status, valid)
            rate = float(status.mean()) if n else 0.0
            rates.append(rate)
            if self.progress:
                self.progress(pass_no, n, n, rate)
            # A pass that accepted no step saw one rho throughout, and every image's outcome depends only on rho:
            # each later pass would repeat it, whatever its order, so stopping here gives the same rho and rate.
            if rate >= 1.0 - s.delta or (self.stop_at_fixed_point and not moved):
                break
        return CraftResult(rho, len(rates), rates, visited, steps, time.perf_counter() - start)

    def _complete(self, cell, rho, status, valid):
        """Batched statuses under rho for every image whose status is not known (all, for the plain loop)."""
        todo = (np.flatnonzero(~valid) if self.speculative else np.arange(len(status))).astype(np.int32)
        if len(todo):
            status[todo] = yield from statuses(cell, todo, rho)
        valid[:] = self.speculative

    def _one_pass(self, cell: Cell, order, rho, pass_no, status, valid, ahead):
        """One pass over `order`: (rho, gradient steps, whether any step was accepted). Speculative: look-ahead
        checks fill `status` where not `valid`; an accepted step (rho moves) invalidates every status."""
        n, i, steps, shown, moved = len(order), 0, 0, -1, False
        while i < n:
            if self.progress and i // 64 > shown:
                shown = i // 64
                self.progress(pass_no, i, n, None)
            probed = 0  # unfooled images whose step the look-ahead found rejected, before the walk below
            probe = ahead.probe(self.probe_batch) if self.speculative else 1
            if probe > 1:
                known = valid[order[i : i + MAX_WINDOW]]
                run = len(known) if known.all() else int(np.argmin(known))  # statuses known without a model call
                if run:
                    idx = order[i : i + run]
                    candidates = np.flatnonzero(~status[idx])[:probe]
                    accepted = (np.asarray((yield Call("accepted", cell, idx[candidates], rho))) if len(candidates)
                                else None)
                else:
                    idx = order[i : i + ahead.window(probe)]
                    is_fooled, candidates, accepted = yield Call("scan", cell, idx, rho, probe=probe)
                    status[idx], valid[idx] = is_fooled, True
                    ahead.checked(len(idx), len(idx) - int(is_fooled.sum()))
                if not len(candidates):
                    i += len(idx)
                    continue
                if not accepted.any():  # all rejected: rho stays
                    steps += len(candidates)
                    ahead.stepped(len(candidates), 0)
                    more = np.count_nonzero(~status[idx]) > len(candidates)  # unfooled images beyond the probe
                    i += int(candidates[-1]) + 1 if more else len(idx)
                    continue
                probed = int(np.argmax(accepted))
                steps += probed
                i += int(candidates[probed])
            # the images the walk below visits in one call: where steps are accepted often, the next WALK ones
            walk = order[i : i + (WALK if self.speculative and probe == 1 else 1)]
            skip = valid[walk] & status[walk] if self.speculative else np.zeros(len(walk), bool)
            if skip.all():
                i += len(walk)
                continue
            rho, was_fooled, accepted_here = yield Call("walk", cell, walk, rho, skip=skip)
            unfooled = len(walk) - int(was_fooled.sum())
            steps += unfooled
            moved = moved or bool(accepted_here.any())
            if self.speculative:
                ahead.stepped(probed + unfooled, int(accepted_here.sum()))
                if len(walk) > 1:
                    ahead.checked(int(np.count_nonzero(~skip)), unfooled)
                after = len(walk) - int(np.argmax(accepted_here[::-1])) if accepted_here.any() else 0
                if after:
                    valid[:] = False  # rho moved: only the images walked after its last move are known
                status[walk[after:]], valid[walk[after:]] = was_fooled[after:], True
            i += len(walk)
        return np.asarray(rho, np.float32), steps, moved
