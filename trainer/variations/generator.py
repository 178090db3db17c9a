"""The variation generator: requests through the official `openai` client (its own retries off) to any
OpenAI-compatible endpoint, or to the embedded llama.cpp server it starts; a retry loop with exponential
backoff and jitter that counts and logs each attempt; failures recorded on the item, never raised mid-batch."""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

from guardloop.trainer.variations.endpoint import AttemptFailed, attempt_failures, chat_once
from guardloop.trainer.variations.hygiene import HygieneConfig, PredictProba, apply_hygiene, consistency_filter
from guardloop.trainer.variations.judge import LLMJudge
from guardloop.trainer.variations.llm_server import LocalLLMServer
from guardloop.trainer.variations.prompt import build_compose_messages, build_messages
from guardloop.trainer.variations.records import VariationBatch, VariationResult, VariationStats
from guardloop.trainer.variations.verifier import Embed, Verifier, VerifierConfig

from guardloop.core import trainer_telemetry
from guardloop.core.labels import parse_label

if TYPE_CHECKING:
    import openai

    from guardloop.core.settings import Settings

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- the generator
@dataclass(frozen=True)
class VariationConfig:
    k: int = 5
    temperature: float = 0.8
    max_tokens: int = 256
    timeout: float = 60.0  # seconds per request
    retries: int = 2  # attempts after the first one
    backoff: float = 1.0  # seconds before the first retry; doubles each time
    max_backoff: float = 30.0
    consistency_threshold: float = 0.8
    stop_after_consecutive_failures: int = 3  # generate_many gives up on an endpoint that keeps failing
    hygiene: HygieneConfig = field(default_factory=HygieneConfig)
    # The verifier every accepted variation passes (verifier.py); None: hygiene and consistency filter only.
    # from_settings turns it on (settings.llm_verify, on by default); a bare config leaves it off.
    verifier: VerifierConfig | None = None
    judge: bool = False  # the verifier asks the same LLM a constrained label question about each rewrite
    # Requests per item at most: another is sent while fewer rewrites than it wants (k or its budget) have been
    # accepted. 1 is the paper's single request; from_settings takes settings.llm_rounds.
    rounds: int = 1

    def __post_init__(self) -> None:
        if self.k < 1 or self.rounds < 1:
            raise ValueError("k and rounds must be at least 1")
        if self.retries < 0 or self.timeout <= 0 or self.backoff < 0:
            raise ValueError("retries must be >= 0, timeout > 0 and backoff >= 0")


class VariationGenerator:
    """Writes label-preserving variations through an OpenAI-compatible endpoint.

    With `base_url=None` it starts the embedded SmolLM2 server (LocalLLMServer) on `start()` / `with` and stops it
    on `close()`. Use one generator per thread.
    """

    def __init__(
        self,
        config: VariationConfig | None = None,
        *,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        predict_proba: PredictProba | None = None,
        embedded_server: Callable[[], LocalLLMServer] | None = None,
        embed: Embed | None = None,
        teacher: PredictProba | None = None,
    ) -> None:
        self.config = config or VariationConfig()
        self.base_url = base_url
        self.model = model
        self._api_key = api_key
        self.predict_proba = predict_proba
        self._embedded_server_factory = embedded_server
        self._server: LocalLLMServer | None = None
        self._client: openai.OpenAI | None = None
        self.embed = embed  # sentence embeddings for the verifier's drift check; None: no drift check
        self.teacher = teacher  # a second classifier for the verifier; None: none
        self._verifier_instance: Verifier | None = None  # built on first use: its judge needs the started client
        self.stats = VariationStats()

    @classmethod
    def from_settings(
        cls, settings: Settings, predict_proba: PredictProba | None = None, *, embed: Embed | None = None
    ) -> VariationGenerator:
        """The generator the settings describe; `embed` (the cycle's sentence embedder) turns on the drift check."""
        config = VariationConfig(
            k=settings.llm_variations,
            temperature=settings.llm_temperature,
            max_tokens=settings.llm_max_tokens,
            timeout=settings.llm_timeout_seconds,
            retries=settings.llm_retries,
            backoff=settings.llm_backoff_seconds,
            consistency_threshold=settings.llm_consistency_threshold,
            verifier=VerifierConfig() if settings.llm_verify else None,
            judge=settings.llm_verify,
            rounds=settings.llm_rounds,
        )

        def embedded_server() -> LocalLLMServer:
            return LocalLLMServer(threads=settings.llm_threads, seed=settings.seed)

        return cls(
            config,
            base_url=settings.llm_base_url,
            model=settings.llm_model,
            api_key=settings.llm_api_key.get_secret_value() if settings.llm_api_key else None,
            predict_proba=predict_proba,
            embedded_server=embedded_server,
            embed=embed,
        )

    # ----------------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> VariationGenerator:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start the embedded server when no endpoint is configured (raises LLMServerError if it cannot)."""
        if self._client is not None:
            return
        import openai  # about a second to import: only a generator that is started pays it

        base_url = self.base_url
        if base_url is None:
            factory = self._embedded_server_factory or LocalLLMServer
            self._server = factory()
            self._server.start()
            base_url = self._server.base_url
            self.model = self.model or self._server.model
        self._client = openai.OpenAI(
            base_url=base_url,
            api_key=self._api_key or "unused",  # local servers want none; the client wants a string
            timeout=self.config.timeout,
            max_retries=0,  # retries happen in _request, where they are counted and logged
        )
        log.info("LLM variations via %s (model %s)", base_url, self.model or "first listed by the server")

    def close(self) -> None:
        self._verifier_instance = None
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def endpoint(self) -> str | None:
        return self._server.base_url if self._server else self.base_url

    # ----------------------------------------------------------------------------------------- generation
    def generate(
        self, text: str, label: str, want: int | None = None, companions: Sequence[str] = ()
    ) -> VariationResult:
        """Variations for one labeled text: one request, then, while fewer than `want` (at most k; None: k) rewrites
        have passed every check, up to `config.rounds - 1` more (a small LLM's rewrites are mostly rejected, so one
        request rarely yields what the class-deficit budget asked for). Endpoint failures are recorded on the
        result, never raised; one after a first answer ends the rounds and keeps what was accepted.

        `companions`: other labeled texts of the same class; when the rounds leave the item short of `want`, one
        more request asks for new posts of the class written from it and them (see `compose`)."""
        label = parse_label(label)
        target = self._target(want)
        self.start()
        result = VariationResult(text=text, label=label)
        started = time.monotonic()
        messages = build_messages(text, label, self.config.k)
        for round_index in range(self.config.rounds):
            asked = time.monotonic()
            try:
                content, tokens = self._request(messages, result)
            except AttemptFailed as failure:
                trainer_telemetry.record_llm_request(time.monotonic() - asked, failed=True)
                if round_index == 0:
                    result.error, result.error_detail = failure.reason, failure.detail
                break
            request_seconds = time.monotonic() - asked  # the request alone: the verifier's time is not the LLM's
            result.raw_output = content if result.raw_output is None else f"{result.raw_output}\n{content}"
            result.completion_tokens += tokens
            result.rounds += 1
            answered = self._accept(result, content, target)
            trainer_telemetry.record_llm_request(request_seconds, failed=not answered)
            if not answered:
                if round_index == 0:
                    result.error = "garbage_output"
                    result.error_detail = f"no variation in the answer: {content[:200]!r}"
                    result.attempt_errors.append("garbage_output")
                    self.stats.failures["garbage_output"] += 1
                break
            if result.error_detail is not None or len(result.accepted) >= target:
                break  # enough, or the consistency check broke: more requests would be filtered the same way
        if companions and result.error is None and result.error_detail is None and len(result.accepted) < target:
            self._compose(result, companions, target)
        result.seconds = time.monotonic() - started
        self._count(result)
        return result

    def compose(self, text: str, label: str, companions: Sequence[str], want: int | None = None) -> VariationResult:
        """Up to `want` (at most k; None: k) new posts of `label` written from `text` and `companions` (other
        labeled texts of that class) in one request, each through hygiene, the verifier (drift measured to the
        nearest of those texts) and the consistency filter, like a rewrite. For a rare class whose few items'
        rewrites are mostly rejected; they are attached to `text`'s item."""
        label = parse_label(label)
        target = self._target(want)
        self.start()
        result = VariationResult(text=text, label=label)
        started = time.monotonic()
        self._compose(result, companions, target)
        result.seconds = time.monotonic() - started
        self._count(result)
        return result

    def _target(self, want: int | None) -> int:
        target = self.config.k if want is None else min(self.config.k, want)
        if target < 1:
            raise ValueError(f"want must be at least 1, not {want}: an item that wants none is not sent")
        return target

    def _compose(self, result: VariationResult, companions: Sequence[str], target: int) -> None:
        """One composing request for the part of `target` that `result.accepted` lacks. A failure is the item's
        error only when nothing else was asked for it (`compose`); after rewrite rounds it keeps what they gave."""
        have = len(result.accepted)
        messages = build_compose_messages([result.text, *companions], result.label, target - have)
        asked = time.monotonic()
        try:
            content, tokens = self._request(messages, result)
        except AttemptFailed as failure:
            trainer_telemetry.record_llm_request(time.monotonic() - asked, failed=True)
            if not result.rounds:
                result.error, result.error_detail = failure.reason, failure.detail
            return
        request_seconds = time.monotonic() - asked
        result.raw_output = content if result.raw_output is None else f"{result.raw_output}\n{content}"
        result.completion_tokens += tokens
        answered = self._accept(result, content, target, also=companions)
        trainer_telemetry.record_llm_request(request_seconds, failed=not answered)
        result.composed += len(result.accepted) - have

    def generate_many(
        self,
        items: Iterable[tuple[str, str]],
        *,
        raise_on_failure: bool = False,
        on_result: Callable[[VariationResult], None] | None = None,
        wants: Sequence[int] | None = None,
        companions: Sequence[Sequence[str]] | None = None,
    ) -> VariationBatch:
        """Variations for each (text, label); carries on past failed items and reports them in the batch.

        After `config.stop_after_consecutive_failures` failed items in a row the endpoint is taken to be down:
        the remaining items are marked failed ("endpoint_down") without sending them. With raise_on_failure,
        the first failed item raises VariationError instead. `wants`: how many variations each item should end
        with (its class-deficit budget, each at least 1); None: k for every item. `companions`: per item, other
        labeled texts of its class to compose from when its rewrites fall short (`generate`); None: none.
        """
        pairs = [(text, parse_label(label)) for text, label in items]
        if wants is not None and len(wants) != len(pairs):
            raise ValueError(f"{len(wants)} wants for {len(pairs)} items")
        if companions is not None and len(companions) != len(pairs):
            raise ValueError(f"{len(companions)} companion lists for {len(pairs)} items")
        before = copy.deepcopy(self.stats)
        results: list[VariationResult] = []
        consecutive_failures = 0
        for index, (text, label) in enumerate(pairs):
            if consecutive_failures >= self.config.stop_after_consecutive_failures:
                result = VariationResult(
                    text=text,
                    label=label,
                    error="endpoint_down",
                    error_detail=f"not sent: the {consecutive_failures} items before it failed",
                )
                self._count(result)
            else:
                want = None if wants is None else wants[index]
                result = self.generate(text, label, want, () if companions is None else companions[index])
            consecutive_failures = consecutive_failures + 1 if result.failed else 0
            if result.failed:
                log.error(
                    "LLM variations failed for item %d/%d (%s): %s: %s",
                    index + 1,
                    len(pairs),
                    label,
                    result.error,
                    result.error_detail,
                )
                if raise_on_failure:
                    raise VariationError(result)
            else:
                log.info(
                    "item %d/%d (%s): %d accepted, filtered %s, %d attempt(s), %.1fs",
                    index + 1,
                    len(pairs),
                    label,
                    len(result.accepted),
                    dict(result.filtered) or "nothing",
                    result.attempts,
                    result.seconds,
                )
            results.append(result)
            if on_result is not None:
                on_result(result)
        return VariationBatch(results=results, stats=self.stats.since(before))

    def _accept(self, result: VariationResult, content: str, target: int, also: Sequence[str] = ()) -> bool:
        """Add the answer's rewrites that pass hygiene, the verifier and the consistency filter to
        `result.accepted`, up to `target` in all; False when the answer holds nothing that even looks like one.
        `also`: the other texts a composed answer was written from (a repeat of one is a duplicate)."""
        already = [*result.accepted, *also]
        candidates, filtered = apply_hygiene(result.text, content, self.config.hygiene, already)
        result.filtered.update(filtered)
        if not candidates and not filtered:
            return False
        if self.config.verifier is not None and candidates:
            result.verified += len(candidates)
            candidates, rejected = self.verifier().verify(result.text, result.label, candidates, also)
            result.filtered.update(rejected)
        if self.predict_proba is not None and candidates:
            try:
                candidates, inconsistent = consistency_filter(
                    candidates, result.label, self.predict_proba, self.config.consistency_threshold
                )
            except Exception as exc:  # the model is not the LLM's fault, but unverified variations are not kept
                log.exception("consistency check failed; dropping %d unverified variations", len(candidates))
                result.filtered["unverified"] += len(candidates)
                candidates = []
                result.error_detail = f"consistency check failed: {exc}"
            else:
                if inconsistent:
                    result.filtered["inconsistent_label"] += inconsistent
        room = target - len(result.accepted)
        if len(candidates) > room:
            result.filtered["surplus"] += len(candidates) - room
        result.accepted += candidates[:room]
        return True

    def verifier(self) -> Verifier:
        """The verifier this generator runs (built on first use: its judge asks the endpoint, started if need be)."""
        self.start()
        assert self._client is not None
        if self._verifier_instance is None:
            judge = LLMJudge(self._client, self.model or self._first_listed_model()) if self.config.judge else None
            config = self.config.verifier or VerifierConfig()
            self._verifier_instance = Verifier(config, judge=judge, embed=self.embed, teacher=self.teacher)
        return self._verifier_instance

    def _count(self, result: VariationResult) -> None:
        self.stats.items += 1
        self.stats.items_failed += int(result.failed)
        self.stats.accepted += len(result.accepted)
        self.stats.filtered.update(result.filtered)
        self.stats.completion_tokens += result.completion_tokens
        trainer_telemetry.record_variations(len(result.accepted), sum(result.filtered.values()))

    # ----------------------------------------------------------------------------------------- one request
    def _request(self, messages: list[dict[str, str]], result: VariationResult) -> tuple[str, int]:
        """The answer's text and completion tokens, after up to 1 + retries attempts with exponential backoff."""
        attempts = 1 + self.config.retries
        for attempt in range(attempts):
            if attempt:
                delay = min(self.config.max_backoff, self.config.backoff * 2 ** (attempt - 1))
                delay *= random.uniform(0.5, 1.0)  # jitter: retries from several trainers do not line up
                self.stats.retries += 1
                time.sleep(delay)
            result.attempts += 1
            try:
                return self._attempt(messages)
            except AttemptFailed as failure:
                self.stats.failures[failure.reason] += 1
                result.attempt_errors.append(failure.reason)
                if not failure.retryable or attempt == attempts - 1:
                    raise
                log.warning(
                    "LLM request failed (%s: %s); retry %d of %d",
                    failure.reason,
                    failure.detail,
                    attempt + 1,
                    self.config.retries,
                )
        raise AssertionError("unreachable")

    def _attempt(self, messages: list[dict[str, str]]) -> tuple[str, int]:
        assert self._client is not None
        started = time.monotonic()
        self.stats.requests += 1
        try:
            config = self.config
            with attempt_failures(config.timeout):
                model = self.model or self._first_listed_model()
            return chat_once(
                self._client,
                model,
                messages,
                temperature=config.temperature,
                max_tokens=config.max_tokens,
                timeout=config.timeout,
            )
        finally:
            self.stats.request_seconds += time.monotonic() - started

    def _first_listed_model(self) -> str:
        assert self._client is not None
        models = [entry.id for entry in self._client.models.list()]
        if not models:
            raise AttemptFailed("no_model", "the endpoint lists no models; set GUARDLOOP_LLM_MODEL", retryable=False)
        self.model = models[0]
        return self.model


class VariationError(Exception):
    """Raised by generate_many(raise_on_failure=True) for the first item the LLM failed on."""

    def __init__(self, result: VariationResult) -> None:
        super().__init__(f"LLM variations failed ({result.error}): {result.error_detail}")
        self.result = result
