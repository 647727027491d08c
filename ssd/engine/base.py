"""Shared engine machinery: request admission, target sampling/verification, statistics.

`step()` of every engine is schedule -> run -> postprocess; the three engines differ only in
where speculations come from (none / the draft, sequentially / the speculation cache).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..config import EngineConfig, RequestOptions, SamplingParams
from ..errors import ContextTooLong, RequestError
from ..kernels.rejection import greedy_verify, rejection_sample
from ..sampling import adjust_logits, coupled_scores, process_logits, sample, token_logprobs
from .sequence import Proposal, Scheduler, Sequence, Source, count_accepted_per_pos
from .target_runner import TargetRunner


@dataclass
class EngineStats:
    tokens: int = 0  # committed output tokens
    prefill_tokens: int = 0  # of which sampled from the prefill (one per request)
    requests: int = 0
    rounds: int = 0  # per-sequence verify rounds
    steps: int = 0  # batched target forwards (prefill excluded)
    num_drafts: int = 0  # speculations verified (vLLM naming)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    cache_hit: int = 0  # speculation ready in the cache when verification ended
    cache_late: int = 0  # found in the cache, but the cache arrived after verification ended
    cache_miss: int = 0
    index_hit: int = 0  # of the hits, found in the speculation index (another request's draft work)
    cut_draft_tokens: int = 0  # adaptive SSD: cached draft tokens left unverified (docs/algorithm.md section 7d)
    tokens_after_hit: int = 0  # committed tokens of rounds whose speculation came from the cache
    rounds_after_hit: int = 0
    tokens_after_miss: int = 0  # ... from the just-in-time draft or the fast backup
    rounds_after_miss: int = 0
    tokens_after_jit: int = 0  # the miss rounds split by source (SSD: JIT draft | fast backup)
    rounds_after_jit: int = 0
    tokens_after_backup: int = 0
    rounds_after_backup: int = 0
    t_prefill: float = 0.0
    t_verify: float = 0.0  # target forwards of verify / AR steps (seconds, summed)
    t_draft: float = 0.0  # SD: sequential drafting
    t_jit: float = 0.0  # SSD: waiting for just-in-time speculations
    n_jit: int = 0
    t_backup: float = 0.0  # SSD: fast-backup proposals
    n_backup: int = 0
    t_build: float = 0.0  # SSD: cache construction on the draft (its own clock)
    n_build: int = 0
    t_wait_cache: float = 0.0  # SSD: target idle waiting for a late cache
    wall: float = 0.0

    def record_accepts(self, num_draft: int, num_accepted: int) -> None:
        if num_draft == 0:  # a target-only round (a request served as AR)
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft
        self.num_accepted_tokens += num_accepted
        count_accepted_per_pos(self.accepted_per_pos, num_draft, num_accepted)

    def summary(self) -> dict:
        lookups = self.cache_hit + self.cache_late + self.cache_miss
        out = {
            "tokens": self.tokens,
            "requests": self.requests,
            "wall_s": round(self.wall, 4),
            "tokens_per_s": self.tokens / self.wall if self.wall > 0 else 0.0,
            "rounds": self.rounds,
            # tokens per target decode/verify round (the prefill's first token excluded)
            "mean_accepted_length": ((self.tokens - self.prefill_tokens) / self.rounds) if self.rounds else None,
            "acceptance_rate": (self.num_accepted_tokens / self.num_draft_tokens) if self.num_draft_tokens else None,
            "accepted_per_pos": list(self.accepted_per_pos),
            "num_drafts": self.num_drafts,
            "cache_hit_rate": ((self.cache_hit + self.cache_late) / lookups) if lookups else None,
            "cache": {"hit": self.cache_hit, "late": self.cache_late, "miss": self.cache_miss},
        }
        out["timings"] = {
            k: getattr(self, k)
            for k in ("t_prefill", "t_verify", "t_draft", "t_jit", "n_jit", "t_backup", "n_backup", "t_build", "n_build", "t_wait_cache", "steps")
        }
        return out


class Engine:
    """Base: admission, prefill, target-side sampling and verification."""

    mode = "base"

    def __init__(self, cfg: EngineConfig, target_model, eos_token_ids: tuple[int, ...]):
        self.cfg = cfg
        torch.set_num_threads(cfg.target_threads)  # this process's budget; the SSD draft has its own
        self.K = cfg.speculation.num_speculative_tokens
        self.target = TargetRunner(target_model, cfg.max_batch, cfg.max_model_len, self.K)
        self.vocab_size = target_model.cfg.vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.scheduler = Scheduler(cfg.max_batch)
        self.stats = EngineStats()
        # on_step(record): called after every batched verify step with what each sequence's
        # round did (the services turn it into ssd.verify spans and metrics; see RoundRecord)
        self.on_step = None
        self.step_count = 0

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, options: RequestOptions | None = None) -> Sequence:
        if not prompt_ids:
            raise RequestError("prompt is empty")
        if len(prompt_ids) + 1 > self.cfg.max_model_len:
            raise ContextTooLong(
                f"prompt has {len(prompt_ids)} tokens; the context length is {self.cfg.max_model_len}"
            )
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        bad = [t for t, _ in params.logit_bias if t >= self.vocab_size]
        if bad:
            raise RequestError(f"logit_bias token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        seq = Sequence(list(prompt_ids), params, self.eos_token_ids, options=options or RequestOptions())
        self.scheduler.add(seq)
        self.stats.requests += 1
        return seq

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Sequence]:
        plist = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        t0 = time.perf_counter()
        while self.has_unfinished():
            self.step()
        self.stats.wall += time.perf_counter() - t0
        return seqs

    def abort(self, seq: Sequence) -> None:
        seq.finished, seq.finish_reason = True, "abort"
        if seq in self.scheduler.waiting:
            self.scheduler.waiting.remove(seq)
        self._retire()

    def close(self) -> None:
        pass

    def idle(self) -> None:
        """Called when no request is left: deliver whatever is still owed elsewhere (the SSD
        engine tells its draft about the sequences that just finished)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- pieces the engines share ------------------------------------------------------
    def step(self) -> list[tuple[Sequence, list[int]]]:
        raise NotImplementedError

    def _prefill(self, new: list[Sequence]) -> list[tuple[Sequence, list[int]]]:
        """Prefill new sequences and sample their first token (counts toward TTFT)."""
        if not new:
            return []
        t0 = time.perf_counter()
        for s in new:
            self.target.allocate(s)
        logits = self.target.forward(new, None, 1)[:, 0]  # [B, V]
        tokens = self._sample_rows(new, logits)
        events = []
        for b, (s, t) in enumerate(zip(new, tokens)):
            if t is None:  # this request failed alone (see _isolated)
                events.append((s, []))
                continue
            kept = self._commit_tokens(s, [t], logits[b:b + 1])
            self.target.commit_features(s)
            self.stats.tokens += len(kept)
            self.stats.prefill_tokens += len(kept)
            events.append((s, kept))
        self.stats.t_prefill += time.perf_counter() - t0
        return events

    def _sample_rows(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int | None]:
        """One token per row from the target distribution. logits [B, V]. None for a row whose
        own sampling failed: that sequence is failed, the others are unaffected."""
        out = []
        for b, s in enumerate(seqs):
            def one():
                row = self._adjusted(s, logits[b:b + 1])[0]
                if s.params.greedy:
                    return int(row.argmax())
                p = process_logits(row, s.params)
                if s.params.seed is not None:
                    return int(coupled_scores(p[None], s.params.seed, len(s.context), s.race_noise)[0].argmax())
                return int(sample(p, s.generator))
            out.append(_isolated(s, one))
        return out

    def _adjusted(self, s: Sequence, logits: torch.Tensor, drafted: list[int] = ()) -> torch.Tensor:
        """The rows [n, V] of s's target logits after its penalties, bias and min_tokens (row i
        follows drafted[:i]); the logits themselves when s sets none (ssd/sampling.py)."""
        return adjust_logits(logits, s.params, s.prompt_ids, s.output_ids, drafted, self.eos_token_ids)

    def _commit_tokens(self, s: Sequence, tokens: list[int], logits: torch.Tensor) -> list[int]:
        """Append tokens (cut at a stop) and, when the request asked for them, their
        log-probabilities from the target's logits [len(tokens), V] (row i chose tokens[i])."""
        kept = s.commit(tokens, self.cfg.max_model_len)
        if s.params.logprobs is not None and kept:
            s.logprobs.extend(token_logprobs(logits, kept, s.params.logprobs))
        return kept

    def _verify_rows(self, seqs: list[Sequence], logits: torch.Tensor, specs: list[Proposal]) -> list[tuple[int, int]]:
        """Outcome (k, t*) per row. logits [B, K+1, V]; specs[b]: the row's Proposal.
        Rows are verified in batches of one kind and speculation length: greedy; seeded sampled
        (coupled: the target's token at each position is fixed by the seed, ssd/sampling.py
        coupled_scores, and drafts are checked against it); other sampled rows (rejection
        sampling, each row drawing its uniforms from its own generator, so a sequence's
        randomness never depends on its neighbours)."""
        out: list[tuple[int, int] | None] = [None] * len(seqs)
        groups: dict[tuple[str, int], list[int]] = {}
        for b, s in enumerate(seqs):
            groups.setdefault((_verify_kind(s.params), specs[b].token_ids.numel()), []).append(b)
        for (kind, n), rows in groups.items():
            if n == 0:  # target-only rows (requests served as AR): sampled exactly as the AR engine does
                for b, t in zip(rows, self._sample_rows([seqs[b] for b in rows], logits[rows, 0])):
                    out[b] = None if t is None else (0, t)
                continue
            try:
                self._verify_group(seqs, logits, specs, kind, n, rows, out)
            except Exception:  # noqa: BLE001 - find the row at fault; only it fails
                if len(rows) == 1:
                    seqs[rows[0]].fail(f"verification failed: {_describe_exc()}")
                    continue
                for b in rows:
                    _isolated(seqs[b], lambda: self._verify_group(seqs, logits, specs, kind, n, [b], out))
        return out

    def _verify_group(self, seqs, logits, specs, kind: str, n: int, rows: list[int], out: list) -> None:
        """Verify rows (same kind, same speculation length) together into out."""
        d = torch.stack([specs[b].token_ids.view(-1) for b in rows])  # [G, n]
        lg = logits[rows, : n + 1]  # [G, n+1, V]
        if any(seqs[b].params.adjusts_logits for b in rows):
            lg = torch.stack([self._adjusted(seqs[b], lg[i], d[i].tolist()) for i, b in enumerate(rows)])
        if kind == "greedy":
            ks, ts = greedy_verify(d, lg)
        elif kind == "coupled":
            ks, ts = greedy_verify(d, torch.stack([
                coupled_scores(process_logits(lg[i], seqs[b].params), seqs[b].params.seed, len(seqs[b].context),
                               seqs[b].race_noise)
                for i, b in enumerate(rows)]))
        else:
            p = torch.stack([process_logits(lg[i], seqs[b].params) for i, b in enumerate(rows)])
            q = torch.stack([specs[b].q for b in rows])  # [G, n, V]
            u_accept, u_token = [], []
            for b in rows:
                u_accept.append(torch.rand((1, n), generator=seqs[b].generator)[0])
                u_token.append(torch.rand((1,), generator=seqs[b].generator)[0])
            ks, ts = rejection_sample(d, q, p, torch.stack(u_accept), torch.stack(u_token))
        for i, b in enumerate(rows):
            out[b] = (int(ks[i]), int(ts[i]))

    def _commit_outcome(self, s: Sequence, spec_tokens: list[int], k: int, t: int, logits: torch.Tensor) -> list[int]:
        """Commit a verified round: the k accepted draft tokens and t. logits [K+1, V]: the
        row's target logits of the verify block (for logprobs)."""
        kept = self._commit_tokens(s, spec_tokens[:k] + [t], logits)
        self.target.commit_features(s)
        self.stats.tokens += len(kept)
        self.stats.rounds += 1
        self.stats.record_accepts(len(spec_tokens), k)
        s.spec_stats.record(len(spec_tokens), k)
        if not s.finished:
            self.target.rollback(s)
        return kept

    def _new_features(self, s: Sequence):
        """A feature drafter's share of the last commit: the target's features of the positions
        it newly committed (protocol.Features; None when the draft reads none)."""
        from .protocol import Features

        return Features.of(s.features[-1]) if self.target.capture and s.features else None

    def _retire(self) -> list[Sequence]:
        done = self.scheduler.retire()
        for s in done:
            self.target.free(s)
            self._on_finished(s)
        return done

    def _on_finished(self, seq: Sequence) -> None:
        """Free whatever the engine's draft holds for a finished or aborted sequence."""

    def _report(self, record: "StepRecord") -> None:
        if self.on_step is not None:
            self.on_step(record)


@dataclass
class RoundRow:
    """One sequence's round within a batched step."""
    seq: Sequence
    drafted: int          # speculated tokens verified (K; 0 for target-only decoding)
    accepted: int         # of which accepted
    kept: int             # tokens committed (accepted + recovery/bonus, cut at a stop)
    source: Source        # where the verified speculation came from (Source.NONE: a plain decode row)
    cache_result: str | None  # hit | late | miss as counted for that speculation; None: no lookup (first round)


@dataclass
class StepRecord:
    """One batched verify step, wall-clock ns (time.time_ns) so spans can be drawn from it."""
    round: int
    start_ns: int
    end_ns: int
    rows: list[RoundRow]
    jit_ns: tuple[int, int] | None = None      # just-in-time draft before the verify
    lookup_ns: tuple[int, int] | None = None   # wait for the speculation cache + index lookup after it
    jit_seq_ids: tuple = ()
    gate_arm: str | None = None         # adaptive: "spec" (speculation planned) or "plain" (the gate kept every row plain)
    predicted_tps: float | None = None  # committed tokens per second the step's plan expected (None: no plan)
    realised_tps: float | None = None   # and what the whole step (draft wait, verify, cache wait) realised


def _verify_kind(params: SamplingParams) -> str:
    """greedy | coupled (sampled with a seed: reproducible) | sampled (rejection sampling)."""
    return "greedy" if params.greedy else "coupled" if params.seed is not None else "sampled"


def _describe_exc() -> str:
    import sys

    e = sys.exc_info()[1]
    return f"{type(e).__name__}: {e}"


def _isolated(seq: Sequence, fn):
    """fn() for one sequence; if it raises, that sequence alone fails (returns None)."""
    try:
        return fn()
    except Exception:  # noqa: BLE001 - a request's own failure must not end its neighbours
        seq.fail(_describe_exc())
        return None
